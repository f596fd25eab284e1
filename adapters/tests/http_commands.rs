//! Commands for HTTP devices, driven by curl over real sockets: the device long-polls
//! with `hono-ttd`, the test acts as the application on `command/t1` and
//! `command_response/t1/app` through the messaging core's in-process API.

mod support;

use std::time::Duration;

use fe2o3_amqp::types::messaging::{ApplicationProperties, MessageId};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue};
use ferrule_adapters::http::HttpConfig;
use ferrule_command_control::{RequestId, DEFER_TTL_PROPERTY};
use ferrule_messaging::{Consumer, Outcome};
use support::amqp::{command, next, next_response};
use support::clients::{curl, request, HttpAnswer};
use support::platform::{devices, Http, Platform};
use tokio::task::JoinHandle;

type Setup = Platform<Http>;

const D1: Option<&str> = Some("d1@t1:pw1");
const GW: Option<&str> = Some("gw@t1:gwpw");

/// [`devices`] and 50 more in t1 (`pN`, password `pw`), with commands; and the consumer
/// of `event/t1` (the devices' events and the `ttd` notifications).
async fn start() -> (Setup, Consumer) {
    let registry = (0..50).fold(devices(), |r, i| r.device("t1", &format!("p{i}"), "pw"));
    let config = HttpConfig { max_payload: 64, ..Default::default() };
    let s = Platform::with_commands(registry, config).await;
    let events = s.consumer("event/t1", 1000);
    (s, events)
}

/// A long poll: `method` `path` as `user` with `hono-ttd: 10`.
fn poll(s: &Setup, method: &str, path: &str, user: Option<&str>) -> JoinHandle<HttpAnswer> {
    let url = format!("{}{path}", s.url());
    tokio::spawn(curl(request(method, &url, user, "x", &["hono-ttd: 10"])))
}

/// A device's command response: `method` to `/command/res/{rest}`.
fn respond(s: &Setup, method: &str, rest: &str, user: Option<&str>) -> JoinHandle<HttpAnswer> {
    let url = format!("{}/command/res/{rest}", s.url());
    tokio::spawn(curl(request(method, &url, user, "", &[])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_command_round_trip() {
    let (s, mut events) = start().await;
    let mut responses = s.consumer("command_response/t1/app", 10);
    let url = format!("{}/event", s.url());
    let poll = tokio::spawn(curl(request("POST", &url, D1, "21.5", &["hono-ttd: 10"])));
    let light_on = command("d1", "light", "on", Some(("app", "m-1")));
    let answer = s.command_when_waiting(&mut events, "d1", poll, light_on).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("hono-command"), Some("light"));
    assert_eq!(answer.header("content-type"), Some("text/plain"));
    assert!(answer.header("hono-cmd-target-device").is_none(), "own command");
    assert_eq!(answer.body, "on");
    let request_id = answer.header("hono-cmd-req-id").expect("request/response");

    // The device answers; the application gets status and correlation id.
    let url = format!("{}/command/res/{request_id}?hono-cmd-status=200", s.url());
    let respond = tokio::spawn(curl(request("POST", &url, D1, "done", &[])));
    next_response(&mut responses, "m-1", 200, "d1").await.settle(Outcome::Accepted);
    assert_eq!(respond.await.unwrap().status, 202);

    // Query parameter form of hono-ttd on telemetry works the same.
    let mut telemetry = s.consumer("telemetry/t1", 10);
    let url = format!("{}/telemetry?hono-ttd=10", s.url());
    let poll = tokio::spawn(curl(request("POST", &url, D1, "1", &[])));
    next(&mut telemetry).await.settle(Outcome::Accepted);
    let reset = command("d1", "reset", "", Some(("app", "m-2")));
    let answer = s.command_when_waiting(&mut events, "d1", poll, reset).await;
    assert_eq!((answer.status, answer.header("hono-command")), (200, Some("reset")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_command_has_no_request_id() {
    let (s, mut events) = start().await;
    let poll = poll(&s, "POST", "/event", D1);
    let blink = command("d1", "blink", "3", None);
    let answer = s.command_when_waiting(&mut events, "d1", poll, blink).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("hono-command"), Some("blink"));
    assert!(answer.header("hono-cmd-req-id").is_none(), "{answer:?}");
    assert_eq!(answer.body, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_in_time_is_202_and_late_commands_are_released() {
    let (s, _events) = start().await;
    let url = format!("{}/event", s.url());
    let answer = curl(request("POST", &url, D1, "x", &["hono-ttd: 1"])).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert!(answer.header("hono-command").is_none());
    // Nobody polls any more: the application learns at once.
    let outcome = s.send_command(command("d1", "light", "on", Some(("app", "m"))));
    assert_eq!(outcome.await.unwrap(), Outcome::Released);

    // The client gives up (closes the connection) before its ttd is over: released too.
    let mut args = request("POST", &url, D1, "x", &["hono-ttd: 30"]);
    args.extend(["--max-time".into(), "1".into()]);
    assert_eq!(curl(args).await.status, 0, "curl gave up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = s.send_command(command("d1", "light", "on", None));
    assert_eq!(outcome.await.unwrap(), Outcome::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_polls_for_a_device_and_answers_for_it() {
    let (s, mut events) = start().await;
    let mut responses = s.consumer("command_response/t1/app", 10);
    let poll = poll(&s, "PUT", "/event/t1/child", GW);
    let open = command("child", "open", "valve", Some(("app", "g-1")));
    let answer = s.command_when_waiting(&mut events, "child", poll, open).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("hono-cmd-target-device"), Some("child"));
    let request_id = answer.header("hono-cmd-req-id").unwrap();

    let respond_204 = respond(&s, "PUT", &format!("t1/child/{request_id}?hono-cmd-status=204"), GW);
    next_response(&mut responses, "g-1", 204, "child").await.settle(Outcome::Accepted);
    assert_eq!(respond_204.await.unwrap().status, 202);

    // d1 does not list gw in `via`: neither polling nor answering for it.
    let url = format!("{}/event/t1/d1", s.url());
    let answer = curl(request("PUT", &url, GW, "x", &["hono-ttd: 1"])).await;
    assert_eq!(answer.status, 403);
    let for_d1 = respond(&s, "PUT", &format!("t1/d1/{request_id}?hono-cmd-status=200"), GW);
    assert_eq!(for_d1.await.unwrap().status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_responses_get_clear_answers() {
    let (s, _events) = start().await;
    // A request id issued to d1 for reply address `app` (no one listening there).
    let issued =
        RequestId { correlation_id: MessageId::String("x".into()), reply_id: "app".into() };
    let id = issued.seal(&support::request_key(), "t1", "d1").unwrap();
    let url = |rest: &str| format!("{}/command/res/{rest}", s.url());
    let ok = format!("{id}?hono-cmd-status=200");
    let other = issued.seal(&support::request_key(), "t1", "gw").unwrap();
    let not_d1s = format!("{other}?hono-cmd-status=200");
    let big = "x".repeat(65);
    let rows = [
        ("no status", request("POST", &url(&id), D1, "", &[]), 400),
        ("bad status", request("POST", &url(&format!("{id}?hono-cmd-status=1")), D1, "", &[]), 400),
        ("bad request id", request("POST", &url("garbage!?hono-cmd-status=200"), D1, "", &[]), 400),
        ("nobody waits", request("POST", &url(&ok), D1, "", &[]), 503),
        ("issued to another device", request("POST", &url(&not_d1s), D1, "", &[]), 403),
        ("status as header", request("POST", &url(&id), D1, "", &["hono-cmd-status: 200"]), 503),
        ("wrong password", request("POST", &url(&ok), Some("d1@t1:no"), "", &[]), 401),
        ("no credentials", request("POST", &url(&ok), None, "", &[]), 401),
        ("foreign tenant", request("PUT", &url(&format!("t2/d9/{ok}")), D1, "", &[]), 403),
        ("wrong method", request("GET", &url(&id), D1, "", &[]), 405),
        ("too large", request("POST", &url(&ok), D1, &big, &[]), 413),
        (
            "bad hono-ttd",
            request("POST", &format!("{}/event", s.url()), D1, "x", &["hono-ttd: soon"]),
            400,
        ),
    ];
    for (name, args, expected) in rows {
        let answer = curl(args).await;
        assert_eq!(answer.status, expected, "{name}: {answer:?}");
        if expected == 503 {
            assert_eq!(answer.header("retry-after"), Some("1"), "{name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_command_arrives_with_the_next_poll() {
    let (s, _events) = start().await;
    let mut deferred = command("d1", "update", "v2", None);
    let mut app = OrderedMap::new();
    app.insert(DEFER_TTL_PROPERTY.to_owned(), SimpleValue::Int(60));
    deferred.application_properties = Some(ApplicationProperties(app));
    let outcome = s.send_command(deferred);
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted, "kept for the offline device");
    let url = format!("{}/event", s.url());
    let answer = curl(request("POST", &url, D1, "x", &["hono-ttd: 10"])).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("hono-command"), Some("update"));
    assert_eq!(answer.body, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_polls_each_get_their_own_command() {
    let (s, mut events) = start().await;
    let devices: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    let url = format!("{}/event", s.url());
    let polls: Vec<_> = devices
        .iter()
        .map(|d| {
            let user = format!("{d}@t1:pw");
            tokio::spawn(curl(request("POST", &url, Some(&user), "x", &["hono-ttd: 15"])))
        })
        .collect();
    let names: Vec<&str> = devices.iter().map(String::as_str).collect();
    s.ready(&mut events, &names).await;
    let sends: Vec<_> = devices
        .iter()
        .map(|d| s.send_command(command(d, "set", &format!("for {d}"), Some(("app", d)))))
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
