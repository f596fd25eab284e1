//! Commands for CoAP devices, driven by libcoap's coap-client (coap-client-openssl over
//! DTLS-PSK, coap-client-notls over plain UDP): the device waits with `?hono-ttd=N`, the
//! test acts as the application on `command/t1` and `command_response/t1/app` through
//! the messaging core's in-process API. libcoap prints the response PDU (options
//! included) at verbosity 7.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::types::messaging::{MessageId, Properties};
use fe2o3_amqp::types::primitives::SimpleValue;
use ferrule_adapters::coap::{CoapAdapter, CoapConfig};
use ferrule_adapters::Downstream;
use ferrule_command_control::RequestId;
use ferrule_messaging::message::data_message;
use ferrule_messaging::{Broker, Consumer, Message, Outcome, SubscribeOptions};
use support::MemoryRegistry;
use tokio_util::sync::CancellationToken;

struct Setup {
    udp: SocketAddr,
    dtls: SocketAddr,
    broker: Broker,
    /// `event/t1`: the devices' events and the `ttd` notifications.
    events: Consumer,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn start() -> Setup {
    let registry = MemoryRegistry::new().tenant("t1").tenant("t2").device("t2", "d9", "");
    let registry = registry
        .device("t1", "d1", "")
        .device("t1", "gw", "")
        .device_via("t1", "child", "", &["gw"])
        .psk("t1", "sensor1", "d1", b"secret1")
        .psk("t1", "gw1", "gw", b"gwsecret");
    registry.set_allow_unauthenticated("t1", true);
    let (broker, router) = support::broker_with_commands(&registry);
    let events = broker.subscribe("event/t1", &SubscribeOptions::default()).unwrap();
    events.add_credit(1000);
    let config = CoapConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        listen_dtls: "127.0.0.1:0".parse().unwrap(),
        allow_unauthenticated: true,
        max_payload: 64,
        ..Default::default()
    };
    let adapter = CoapAdapter::bind(
        config,
        Downstream::new(broker.clone()),
        Arc::new(registry),
        Some(router),
    )
    .await
    .unwrap();
    let (udp, dtls) = (adapter.local_addr().expect("plain UDP is on"), adapter.local_dtls_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(adapter.run(shutdown.clone()));
    Setup { udp, dtls, broker, events, _shutdown: shutdown.drop_guard() }
}

/// What libcoap printed (stdout: the payload; stderr: the PDUs at `-v 7`).
#[derive(Debug)]
struct Answer {
    payload: String,
    log: String,
}

impl Answer {
    /// The response code of the last response PDU libcoap logged (`c:2.04`).
    fn code(&self) -> Option<&str> {
        self.log.rmatch_indices("c:").find_map(|(i, _)| {
            let code = self.log.get(i + 2..i + 6)?;
            (code.as_bytes()[1] == b'.' && code.as_bytes()[0] >= b'2').then_some(code)
        })
    }

    fn has(&self, option: &str) -> bool {
        self.log.contains(option)
    }
}

/// Runs a libcoap client; the payload goes to a file of its own (`-o`), the log (PDUs
/// at `-v 7`) to stdout.
async fn client(program: &'static str, args: Vec<String>) -> Answer {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let file = std::env::temp_dir().join(format!(
        "ferrule-coap-cmd-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let out = file.to_string_lossy().to_string();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .args(["-B", "30", "-v", "7", "-o", &out])
            .args(&args)
            .output()
            .expect("libcoap3-bin is installed")
    })
    .await
    .unwrap();
    let payload = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Answer { payload, log }
}

/// `coap-client-openssl` over DTLS with PSK `identity`/`key`: `args` then `coaps://ADDR{path}`.
fn dtls(
    s: &Setup,
    identity: &str,
    key: &str,
    args: &[&str],
    path: &str,
) -> tokio::task::JoinHandle<Answer> {
    let mut all: Vec<String> = vec!["-u".into(), identity.into(), "-k".into(), key.into()];
    all.extend(args.iter().map(|a| a.to_string()));
    all.push(format!("coaps://{}{path}", s.dtls));
    tokio::spawn(client("coap-client-openssl", all))
}

fn udp(s: &Setup, args: &[&str], path: &str) -> tokio::task::JoinHandle<Answer> {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.push(format!("coap://{}{path}", s.udp));
    tokio::spawn(client("coap-client-notls", all))
}

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

/// Waits for `device`'s `ttd` notification (> 0, from the CoAP adapter).
async fn ready(events: &mut Consumer, device: &str) {
    loop {
        let d = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("notification")
            .unwrap();
        let m = d.message();
        let waiting = matches!(app_property(m, "ttd"), Some(SimpleValue::Int(n)) if n > 0)
            && app_property(m, "device_id") == Some(SimpleValue::String(device.into()))
            && app_property(m, "orig_adapter") == Some(SimpleValue::String("hono-coap".into()));
        d.settle(Outcome::Accepted);
        if waiting {
            return;
        }
    }
}

/// The request id in the logged Location-Path (`Location-Path:cr` or `command_response`,
/// then tenant/device for gateways, then the id).
fn request_id(answer: &Answer) -> String {
    let line = answer
        .log
        .lines()
        .rev()
        .find(|l| l.contains("Location-Query"))
        .expect("a response with a command");
    let paths: Vec<&str> = line
        .split("Location-Path:")
        .skip(1)
        .map(|p| p.split([',', ' ', ']']).next().unwrap())
        .collect();
    paths.last().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls_device_gets_a_command_and_answers_it() {
    let mut s = start().await;
    let mut responses =
        s.broker.subscribe("command_response/t1/app", &SubscribeOptions::default()).unwrap();
    responses.add_credit(10);
    let poll = dtls(
        &s,
        "sensor1@t1",
        "secret1",
        &["-m", "post", "-e", "21.5", "-t", "0"],
        "/e?hono-ttd=10",
    );
    ready(&mut s.events, "d1").await;
    let outcome =
        s.broker.send("command/t1", command("d1", "light", "on", Some(("app", "m-1")))).await;
    assert_eq!(outcome, Outcome::Accepted);
    let answer = poll.await.unwrap();
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
    assert_eq!(answer.payload, "on", "{answer:?}");
    assert!(answer.has("Location-Query:hono-command=light"), "{}", answer.log);
    assert!(answer.has("Location-Path:cr,"), "short form for /e: {}", answer.log);
    let id = request_id(&answer);
    assert!(RequestId::decode(&id).is_ok(), "{id}");

    let respond = dtls(
        &s,
        "sensor1@t1",
        "secret1",
        &["-m", "post", "-e", "done", "-t", "0"],
        &format!("/cr/{id}?hono-cmd-status=200"),
    );
    let reply =
        tokio::time::timeout(Duration::from_secs(10), responses.recv()).await.unwrap().unwrap();
    assert_eq!(
        reply.message().properties.clone().unwrap().correlation_id,
        Some(MessageId::String("m-1".into()))
    );
    assert_eq!(app_property(reply.message(), "status"), Some(SimpleValue::Int(200)));
    assert_eq!(app_property(reply.message(), "device_id"), Some(SimpleValue::String("d1".into())));
    reply.settle(Outcome::Accepted);
    let answer = respond.await.unwrap();
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_command_comes_as_a_separate_response() {
    let mut s = start().await;
    let poll = dtls(
        &s,
        "sensor1@t1",
        "secret1",
        &["-m", "post", "-e", "x", "-t", "0"],
        "/event?hono-ttd=10",
    );
    ready(&mut s.events, "d1").await;
    // Longer than the adapter waits before it sends the empty ACK.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let outcome =
        s.broker.send("command/t1", command("d1", "light", "off", Some(("app", "m-2")))).await;
    assert_eq!(
        outcome,
        Outcome::Accepted,
        "accepted once the device acknowledged the separate response"
    );
    let answer = poll.await.unwrap();
    assert!(answer.has("t:ACK c:0.00"), "empty ACK first: {}", answer.log);
    assert!(answer.has("t:CON c:2.04"), "separate response: {}", answer.log);
    assert_eq!(answer.payload, "off");
    assert!(answer.has("Location-Path:command_response,"), "long form for /event: {}", answer.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_udp_device_gets_a_one_way_command() {
    let mut s = start().await;
    let poll = udp(&s, &["-m", "put", "-e", "x", "-t", "0"], "/event/t1/d1?hono-ttd=10");
    ready(&mut s.events, "d1").await;
    assert_eq!(
        s.broker.send("command/t1", command("d1", "blink", "3", None)).await,
        Outcome::Accepted
    );
    let answer = poll.await.unwrap();
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
    assert_eq!(answer.payload, "3");
    assert!(answer.has("Location-Path:command,"), "one-way, long form: {}", answer.log);
    assert!(!answer.has("Location-Path:command_response"), "{}", answer.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_in_time_is_a_plain_204_and_late_commands_are_released() {
    let s = start().await;
    let answer =
        dtls(&s, "sensor1@t1", "secret1", &["-m", "post", "-e", "x", "-t", "0"], "/e?hono-ttd=1")
            .await
            .unwrap();
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
    assert!(!answer.has("Location-Query"), "{}", answer.log);
    assert_eq!(
        s.broker.send("command/t1", command("d1", "light", "on", None)).await,
        Outcome::Released
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_waits_for_a_device_and_answers_for_it() {
    let mut s = start().await;
    let mut responses =
        s.broker.subscribe("command_response/t1/app", &SubscribeOptions::default()).unwrap();
    responses.add_credit(10);
    let poll = dtls(
        &s,
        "gw1@t1",
        "gwsecret",
        &["-m", "put", "-e", "x", "-t", "0"],
        "/e/t1/child?hono-ttd=10",
    );
    ready(&mut s.events, "child").await;
    let outcome =
        s.broker.send("command/t1", command("child", "open", "valve", Some(("app", "g-1")))).await;
    assert_eq!(outcome, Outcome::Accepted);
    let answer = poll.await.unwrap();
    assert_eq!(answer.payload, "valve", "{answer:?}");
    assert!(
        answer.has("Location-Path:cr, Location-Path:t1, Location-Path:child,"),
        "{}",
        answer.log
    );
    let id = request_id(&answer);

    let respond = dtls(
        &s,
        "gw1@t1",
        "gwsecret",
        &["-m", "put", "-t", "0", "-e", "ok"],
        &format!("/cr/t1/child/{id}?hono-cmd-status=200"),
    );
    let reply =
        tokio::time::timeout(Duration::from_secs(10), responses.recv()).await.unwrap().unwrap();
    assert_eq!(
        app_property(reply.message(), "device_id"),
        Some(SimpleValue::String("child".into()))
    );
    assert_eq!(
        reply.message().properties.clone().unwrap().correlation_id,
        Some(MessageId::String("g-1".into()))
    );
    reply.settle(Outcome::Accepted);
    assert_eq!(respond.await.unwrap().code(), Some("2.04"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_responses_get_clear_codes() {
    let s = start().await;
    let id = RequestId { correlation_id: MessageId::String("x".into()), reply_id: "app".into() }
        .encode()
        .unwrap();
    let post = ["-m", "post", "-t", "0", "-e", "r"];
    let cases = [
        ("no status", format!("/cr/{id}"), "4.00"),
        ("bad status", format!("/cr/{id}?hono-cmd-status=1000"), "4.00"),
        ("bad request id", "/cr/not-an-id?hono-cmd-status=200".to_owned(), "4.00"),
        ("nobody waits", format!("/command_response/{id}?hono-cmd-status=200"), "5.03"),
        ("foreign tenant", format!("/cr/t2/d9/{id}?hono-cmd-status=200"), "4.05"),
    ];
    for (name, path, code) in cases {
        let answer = dtls(&s, "sensor1@t1", "secret1", &post, &path).await.unwrap();
        assert_eq!(answer.code(), Some(code), "{name}: {}", answer.log);
    }
    let put = ["-m", "put", "-t", "0", "-e", "r"];
    let answer =
        dtls(&s, "sensor1@t1", "secret1", &put, &format!("/cr/t2/d9/{id}?hono-cmd-status=200"))
            .await
            .unwrap();
    assert_eq!(answer.code(), Some("4.03"), "foreign tenant: {}", answer.log);
    let answer = udp(&s, &post, &format!("/cr/{id}?hono-cmd-status=200")).await.unwrap();
    assert_eq!(answer.code(), Some("4.01"), "plain UDP needs the PUT form: {}", answer.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_response_refused_with_reset_releases_the_command() {
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
    let mut s = start().await;
    // A raw UDP device: CON PUT /e/t1/d1?hono-ttd=10, then it answers our CON with RST.
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut request = Packet::new();
    request.header.set_type(MessageType::Confirmable);
    request.header.code = MessageClass::Request(RequestType::Put);
    request.header.message_id = 0x1234;
    request.set_token(vec![7, 7]);
    for segment in ["e", "t1", "d1"] {
        request.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    request.add_option(CoapOption::UriQuery, b"hono-ttd=10".to_vec());
    request.add_option(CoapOption::ContentFormat, vec![]);
    request.payload = b"x".to_vec();
    socket.send_to(&request.to_bytes().unwrap(), s.udp).await.unwrap();
    async fn recv(socket: &tokio::net::UdpSocket) -> Packet {
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        Packet::from_bytes(&buf[..n]).unwrap()
    }
    ready(&mut s.events, "d1").await;
    let ack = recv(&socket).await;
    assert_eq!(
        (ack.header.get_type(), ack.header.message_id),
        (MessageType::Acknowledgement, 0x1234),
        "empty ACK"
    );
    assert_eq!(u8::from(ack.header.code), 0);
    let sending = tokio::spawn({
        let broker = s.broker.clone();
        async move { broker.send("command/t1", command("d1", "light", "on", None)).await }
    });
    let separate = recv(&socket).await;
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(separate.get_token(), &[7, 7]);
    assert_eq!(separate.payload, b"on");
    let [hi, lo] = separate.header.message_id.to_be_bytes();
    socket.send_to(&[0x70, 0x00, hi, lo], s.udp).await.unwrap();
    assert_eq!(sending.await.unwrap(), Outcome::Released, "the device refused it");
}
