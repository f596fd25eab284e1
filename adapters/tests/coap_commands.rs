//! Commands for CoAP devices, driven by libcoap's coap-client (coap-client-openssl over
//! DTLS-PSK, coap-client-notls over plain UDP): the device waits with `?hono-ttd=N`, the
//! test acts as the application on `command/t1` and `command_response/t1/app` through
//! the messaging core's in-process API. libcoap prints the response PDU (options
//! included) at verbosity 7.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use fe2o3_amqp::types::messaging::MessageId;
use ferrule_adapters::coap::CoapConfig;
use ferrule_command_control::RequestId;
use ferrule_messaging::{Consumer, Outcome};
use support::amqp::{command, next_response};
use support::clients::{coap_client, run_to_end};
use support::platform::{devices_with_psks, Coap, Platform, GW1, SENSOR1};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

type Setup = Platform<Coap>;

/// [`devices_with_psks`], t1 letting unauthenticated devices in, with commands; and the
/// consumer of `event/t1` (the devices' events and the `ttd` notifications).
async fn start() -> (Setup, Consumer) {
    let registry = devices_with_psks();
    registry.set_allow_unauthenticated("t1", true);
    let config = CoapConfig { allow_unauthenticated: true, max_payload: 64, ..Default::default() };
    let s = Platform::with_commands(registry, config).await;
    let events = s.consumer("event/t1", 1000);
    (s, events)
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

/// Runs a libcoap client (`addr`, `psk`, `args`, `path` as for [`coap_client`]); the
/// payload goes to a file of its own (`-o`), the log (PDUs at `-v 7`) to stdout.
fn client(
    addr: SocketAddr,
    psk: Option<(&str, &str)>,
    args: &[&str],
    path: &str,
) -> impl Future<Output = Answer> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let file = std::env::temp_dir().join(format!(
        "ferrule-coap-cmd-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let out = file.to_string_lossy().to_string();
    let options = [&["-B", "30", "-v", "7", "-o", &out][..], args].concat();
    let command = coap_client(addr, psk, &options, path);
    async move {
        let output = run_to_end(command).await;
        let payload = std::fs::read_to_string(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Answer { payload, log }
    }
}

/// `coap-client-openssl` over DTLS with `psk` (identity, key), in the background.
fn dtls(s: &Setup, psk: (&str, &str), args: &[&str], path: &str) -> JoinHandle<Answer> {
    tokio::spawn(client(s.dtls(), Some(psk), args, path))
}

/// `coap-client-notls` (plain UDP), in the background.
fn udp(s: &Setup, args: &[&str], path: &str) -> JoinHandle<Answer> {
    tokio::spawn(client(s.udp(), None, args, path))
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
    let (s, mut events) = start().await;
    let mut responses = s.consumer("command_response/t1/app", 10);
    let poll = dtls(&s, SENSOR1, &["-m", "post", "-e", "21.5", "-t", "0"], "/e?hono-ttd=10");
    let light_on = command("d1", "light", "on", Some(("app", "m-1")));
    let answer = s.command_when_waiting(&mut events, "d1", poll, light_on).await;
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
    assert_eq!(answer.payload, "on", "{answer:?}");
    assert!(answer.has("Location-Query:hono-command=light"), "{}", answer.log);
    assert!(answer.has("Location-Path:cr,"), "short form for /e: {}", answer.log);
    let id = request_id(&answer);
    assert!(RequestId::check_form(&id).is_ok(), "{id}");

    let path = format!("/cr/{id}?hono-cmd-status=200");
    let respond = dtls(&s, SENSOR1, &["-m", "post", "-e", "done", "-t", "0"], &path);
    next_response(&mut responses, "m-1", 200, "d1").await.settle(Outcome::Accepted);
    let answer = respond.await.unwrap();
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_command_comes_as_a_separate_response() {
    let (s, mut events) = start().await;
    let poll = dtls(&s, SENSOR1, &["-m", "post", "-e", "x", "-t", "0"], "/event?hono-ttd=10");
    s.ready(&mut events, &["d1"]).await;
    // Longer than the adapter waits before it sends the empty ACK.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let outcome = s.send_command(command("d1", "light", "off", Some(("app", "m-2"))));
    assert_eq!(
        outcome.await.unwrap(),
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
    let (s, mut events) = start().await;
    let poll = udp(&s, &["-m", "put", "-e", "x", "-t", "0"], "/event/t1/d1?hono-ttd=10");
    let blink = command("d1", "blink", "3", None);
    let answer = s.command_when_waiting(&mut events, "d1", poll, blink).await;
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
    assert_eq!(answer.payload, "3");
    assert!(answer.has("Location-Path:command,"), "one-way, long form: {}", answer.log);
    assert!(!answer.has("Location-Path:command_response"), "{}", answer.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_in_time_is_a_plain_204_and_late_commands_are_released() {
    let (s, _events) = start().await;
    let poll = dtls(&s, SENSOR1, &["-m", "post", "-e", "x", "-t", "0"], "/e?hono-ttd=1");
    let answer = poll.await.unwrap();
    assert_eq!(answer.code(), Some("2.04"), "{answer:?}");
    assert!(!answer.has("Location-Query"), "{}", answer.log);
    let outcome = s.send_command(command("d1", "light", "on", None));
    assert_eq!(outcome.await.unwrap(), Outcome::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_waits_for_a_device_and_answers_for_it() {
    let (s, mut events) = start().await;
    let mut responses = s.consumer("command_response/t1/app", 10);
    let poll = dtls(&s, GW1, &["-m", "put", "-e", "x", "-t", "0"], "/e/t1/child?hono-ttd=10");
    let open = command("child", "open", "valve", Some(("app", "g-1")));
    let answer = s.command_when_waiting(&mut events, "child", poll, open).await;
    assert_eq!(answer.payload, "valve", "{answer:?}");
    assert!(
        answer.has("Location-Path:cr, Location-Path:t1, Location-Path:child,"),
        "{}",
        answer.log
    );
    let id = request_id(&answer);

    let path = format!("/cr/t1/child/{id}?hono-cmd-status=200");
    let respond = dtls(&s, GW1, &["-m", "put", "-t", "0", "-e", "ok"], &path);
    next_response(&mut responses, "g-1", 200, "child").await.settle(Outcome::Accepted);
    assert_eq!(respond.await.unwrap().code(), Some("2.04"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_responses_get_clear_codes() {
    let (s, _events) = start().await;
    let issued =
        RequestId { correlation_id: MessageId::String("x".into()), reply_id: "app".into() };
    let id = issued.seal(&support::request_key(), "t1", "d1").unwrap();
    let other = issued.seal(&support::request_key(), "t1", "gw").unwrap();
    let post = ["-m", "post", "-t", "0", "-e", "r"];
    let put = ["-m", "put", "-t", "0", "-e", "r"];
    // (row, arguments, path, response code)
    let rows = [
        ("no status", post, format!("/cr/{id}"), "4.00"),
        ("bad status", post, format!("/cr/{id}?hono-cmd-status=1000"), "4.00"),
        ("bad request id", post, "/cr/not-an-id?hono-cmd-status=200".to_owned(), "4.00"),
        ("nobody waits", post, format!("/command_response/{id}?hono-cmd-status=200"), "5.03"),
        ("issued to another device", post, format!("/cr/{other}?hono-cmd-status=200"), "4.03"),
        ("foreign tenant, POST", post, format!("/cr/t2/d9/{id}?hono-cmd-status=200"), "4.05"),
        ("foreign tenant", put, format!("/cr/t2/d9/{id}?hono-cmd-status=200"), "4.03"),
    ];
    for (row, args, path, code) in rows {
        let answer = dtls(&s, SENSOR1, &args, &path).await.unwrap();
        assert_eq!(answer.code(), Some(code), "{row}: {}", answer.log);
    }
    let answer = udp(&s, &post, &format!("/cr/{id}?hono-cmd-status=200")).await.unwrap();
    assert_eq!(answer.code(), Some("4.01"), "plain UDP needs the PUT form: {}", answer.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_response_refused_with_reset_releases_the_command() {
    let (s, mut events) = start().await;
    // A raw UDP device: CON PUT /e/t1/d1?hono-ttd=10, then it answers our CON with RST.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
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
    socket.send_to(&request.to_bytes().unwrap(), s.udp()).await.unwrap();
    async fn recv(socket: &UdpSocket) -> Packet {
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        Packet::from_bytes(&buf[..n]).unwrap()
    }
    s.ready(&mut events, &["d1"]).await;
    let ack = recv(&socket).await;
    assert_eq!(
        (ack.header.get_type(), ack.header.message_id),
        (MessageType::Acknowledgement, 0x1234),
        "empty ACK"
    );
    assert_eq!(u8::from(ack.header.code), 0);
    let sending = s.send_command(command("d1", "light", "on", None));
    let separate = recv(&socket).await;
    assert_eq!(separate.header.get_type(), MessageType::Confirmable);
    assert_eq!(separate.get_token(), &[7, 7]);
    assert_eq!(separate.payload, b"on");
    let [hi, lo] = separate.header.message_id.to_be_bytes();
    socket.send_to(&[0x70, 0x00, hi, lo], s.udp()).await.unwrap();
    assert_eq!(sending.await.unwrap(), Outcome::Released, "the device refused it");
}
