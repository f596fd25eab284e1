//! The CoAP adapter driven by libcoap's clients (coap-client-notls over plain UDP,
//! coap-client-openssl over DTLS-PSK; Debian package libcoap3-bin) and, for what no
//! well-behaved client sends, by a raw UDP socket. What reaches the messaging core is
//! observed through its in-process consumer API.
//!
//! Size: one test per behaviour of the CoAP adapter (plain and DTLS); shared setup is in
//! `support/`.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use fe2o3_amqp::types::primitives::SimpleValue;
use ferrule_adapters::coap::CoapConfig;
use ferrule_messaging::Outcome;
use support::amqp::{next, text, MessageExt};
use support::clients::{coap_client, run_to_end};
use support::platform::{devices_with_psks, Coap, Platform, GW1, SENSOR1};
use tokio::net::UdpSocket;

type Setup = Platform<Coap>;

async fn start() -> Setup {
    start_with(CoapConfig { max_payload: 64, ..Default::default() }).await
}

/// Starts the adapter with `config`, with unauthenticated access allowed by the adapter
/// (tenants still decide).
async fn start_with(config: CoapConfig) -> Setup {
    let config = CoapConfig { allow_unauthenticated: true, ..config };
    Platform::start(devices_with_psks(), config).await
}

/// What a libcoap client reported.
#[derive(Debug)]
struct Answer {
    /// The response code, `2.04` when the client reported success and nothing else.
    code: String,
    output: String,
}

/// Runs a libcoap client; libcoap prints error responses as `N.NN diagnostic`.
async fn answer(client: Command) -> Answer {
    let output = run_to_end(client).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let code = text
        .lines()
        .find_map(|line| {
            let code = line.trim().get(..4)?;
            let b = code.as_bytes();
            (b[0].is_ascii_digit()
                && b[1] == b'.'
                && b[2].is_ascii_digit()
                && b[3].is_ascii_digit())
            .then(|| code.to_owned())
        })
        .unwrap_or_else(|| {
            if output.status.success() && text.trim().is_empty() {
                "2.04".into()
            } else {
                "none".into()
            }
        });
    Answer { code, output: text }
}

/// libcoap's options here: blocks of at most 8 s.
fn options<'a>(args: &[&'a str]) -> Vec<&'a str> {
    [&["-B", "8"][..], args].concat()
}

/// `coap-client-notls` (plain UDP) with `args`, on `path` (may carry `?query`).
fn udp(s: &Setup, args: &[&str], path: &str) -> impl Future<Output = Answer> {
    answer(coap_client(s.udp(), None, &options(args), path))
}

/// `coap-client-openssl` over DTLS with `psk` (identity, key).
fn dtls(s: &Setup, psk: (&str, &str), args: &[&str], path: &str) -> impl Future<Output = Answer> {
    answer(coap_client(s.dtls(), Some(psk), &options(args), path))
}

/// A raw request: a PUT of `payload` to `/ENDPOINT/t1/d1` (token `ca fe`, text/plain).
fn raw_put(kind: MessageType, message_id: u16, endpoint: &str, payload: &[u8]) -> Vec<u8> {
    let mut p = Packet::new();
    p.header.set_type(kind);
    p.header.code = MessageClass::Request(RequestType::Put);
    p.header.message_id = message_id;
    p.set_token(vec![0xca, 0xfe]);
    for segment in [endpoint, "t1", "d1"] {
        p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    p.add_option(CoapOption::ContentFormat, vec![]); // text/plain
    p.payload = payload.to_vec();
    p.to_bytes().unwrap()
}

/// A socket for a raw device.
async fn raw_device() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Sends `datagram` from `socket` and waits briefly for one answer.
async fn raw_exchange(socket: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Option<Vec<u8>> {
    socket.send_to(datagram, to).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let received =
        tokio::time::timeout(Duration::from_secs(3), socket.recv_from(&mut buf)).await.ok()?;
    let (n, _) = received.unwrap();
    Some(buf[..n].to_vec())
}

/// [`raw_exchange`] that must get an answer, parsed.
async fn raw_answer(socket: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Packet {
    Packet::from_bytes(&raw_exchange(socket, to, datagram).await.expect("an answer")).unwrap()
}

const CON: &[&str] = &["-m", "post"];
const PUT: &[&str] = &["-m", "put", "-e", "x"];
const POST: &[&str] = &["-m", "post", "-e", "x"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls_telemetry_con_is_acknowledged_only_after_the_consumer_accepted() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let args = ["-m", "post", "-t", "50", "-e", "{\"temp\":5}"];
    let request = tokio::spawn(dtls(&s, SENSOR1, &args, "/telemetry"));
    let delivery = next(&mut consumer).await;
    assert!(!request.is_finished(), "no answer before the application accepted");
    assert_eq!(delivery.app_property("device_id"), text("d1"));
    assert_eq!(delivery.app_property("orig_adapter"), text("hono-coap"));
    assert_eq!(delivery.app_property("orig_address"), text("/telemetry"));
    assert_eq!(delivery.app_property("qos"), Some(SimpleValue::Int(1)));
    let props = delivery.message().properties.clone().unwrap();
    assert_eq!(props.content_type.unwrap().as_str(), "application/json");
    assert_eq!(props.to.as_deref(), Some("telemetry/t1"));
    let annotations = delivery.message().message_annotations.clone().unwrap();
    assert_eq!(annotations.0.len(), 2, "tenant_id and device_id");
    delivery.settle(Outcome::Accepted);
    let answer = request.await.unwrap();
    assert_eq!(answer.code, "2.04", "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls_telemetry_non_is_at_most_once() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let answer = dtls(&s, SENSOR1, &["-N", "-m", "post", "-e", "21.5"], "/t").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    let delivery = next(&mut consumer).await;
    assert!(delivery.is_presettled());
    assert_eq!(delivery.app_property("qos"), Some(SimpleValue::Int(0)));
    assert_eq!(delivery.app_property("orig_address"), text("/t"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls_events_are_stored_until_a_consumer_comes() {
    let s = start().await;
    let answer = dtls(&s, SENSOR1, &["-m", "post", "-e", "door open"], "/e?hono-ttl=60").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    let d = next(&mut s.consumer("event/t1", 1)).await;
    assert!(d.durable());
    assert_eq!(d.ttl(), Some(60_000));
    assert_eq!(d.app_property("orig_address"), text("/e"));
    assert_eq!(d.app_property("device_id"), text("d1"));
    d.settle(Outcome::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_unauthenticated_devices_only_where_the_tenant_allows() {
    let s = start().await;
    assert_eq!(udp(&s, PUT, "/telemetry/t1/d1").await.code, "4.01", "tenant does not allow it");
    assert_eq!(udp(&s, CON, "/telemetry").await.code, "4.01", "POST needs DTLS");
    s.registry.set_allow_unauthenticated("t1", true);
    let mut consumer = s.consumer("telemetry/t1", 10);
    let request = tokio::spawn(udp(&s, PUT, "/telemetry/t1/d1"));
    let d = next(&mut consumer).await;
    assert_eq!(d.app_property("device_id"), text("d1"));
    assert_eq!(d.app_property("orig_address"), text("/telemetry/t1/d1"));
    d.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().code, "2.04");
    // NON over plain UDP.
    let answer = udp(&s, &["-N", "-m", "put", "-e", "y"], "/t/t1/d1").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    assert_eq!(next(&mut consumer).await.app_property("qos"), Some(SimpleValue::Int(0)));
    assert_eq!(udp(&s, PUT, "/t/t1/ghost").await.code, "4.04", "unknown device");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn con_without_consumer_is_503_and_non_is_dropped_and_counted() {
    let s = start().await;
    let answer = dtls(&s, SENSOR1, POST, "/t").await;
    assert_eq!(answer.code, "5.03", "{answer:?}");
    let answer = dtls(&s, SENSOR1, &["-N", "-m", "post", "-e", "x"], "/t").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    assert_eq!(s.downstream.stats.dropped.load(Ordering::Relaxed), 1);
    // The 5.03 carries Max-Age, the time to wait before retrying.
    s.registry.set_allow_unauthenticated("t1", true);
    let request = raw_put(MessageType::Confirmable, 7, "t", b"x");
    let response = raw_answer(&raw_device().await, s.udp(), &request).await;
    assert_eq!(response.header.code, MessageClass::Response(ResponseType::ServiceUnavailable));
    assert_eq!(response.get_first_option(CoapOption::MaxAge), Some(&vec![1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_psk_fails_the_handshake() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    // A wrong key: the client's Finished cannot be authenticated, and DTLS drops records
    // it cannot authenticate (RFC 6347 §4.1.2.7) rather than answer them, so the client
    // gives up on its own; nothing is delivered.
    let answer = dtls(&s, ("sensor1@t1", "not-the-key"), CON, "/t").await;
    assert_eq!(answer.code, "none", "{answer:?}");
    assert!(consumer.try_recv().is_err(), "nothing from a client with the wrong key");
    let answer = dtls(&s, ("nobody@t1", "secret1"), CON, "/t").await;
    assert!(answer.output.contains("alert"), "unknown auth-id: {answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenant_is_refused() {
    let s = start().await;
    let answer = dtls(&s, ("sensor1@nope", "secret1"), CON, "/t").await;
    assert!(answer.output.contains("alert"), "DTLS: {answer:?}");
    assert_eq!(udp(&s, PUT, "/t/nope/d1").await.code, "4.01", "plain UDP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_device_is_forbidden() {
    let s = start().await;
    s.registry.set_allow_unauthenticated("t1", true);
    s.registry.set_device_enabled("t1", "d1", false);
    assert_eq!(udp(&s, PUT, "/t/t1/d1").await.code, "4.03");
    s.registry.set_device_enabled("t1", "child", false);
    let answer = dtls(&s, GW1, PUT, "/t/t1/child").await;
    assert_eq!(answer.code, "4.03", "gateway for a disabled device: {answer:?}");
    // A disabled tenant: its devices' PSKs are refused, and it lets nobody in unauthenticated
    // (4.01, as for a tenant that does not allow it: no hint whether its devices exist).
    s.registry.set_tenant_enabled("t1", false);
    let answer = dtls(&s, GW1, PUT, "/t/t1/gw").await;
    assert!(answer.output.contains("alert"), "DTLS: {answer:?}");
    assert_eq!(udp(&s, PUT, "/t/t1/gw").await.code, "4.01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_publishes_only_for_devices_that_list_it() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let request = tokio::spawn(dtls(&s, GW1, PUT, "/t/t1/child"));
    let d = next(&mut consumer).await;
    assert_eq!(d.app_property("device_id"), text("child"));
    d.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().code, "2.04");
    let answer = dtls(&s, GW1, PUT, "/t/t1/d1").await;
    assert_eq!(answer.code, "4.03", "d1 does not list gw in via: {answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_codes() {
    let s = start().await;
    let big = "x".repeat(65);
    // (row, arguments, path, response code)
    let rows: [(&str, &[&str], &str, &str); 5] = [
        ("foreign tenant in URI", PUT, "/t/t2/d9", "4.03"),
        ("NON event", &["-N", "-m", "post", "-e", "x"], "/event", "4.00"),
        ("unknown URI", POST, "/nothing", "4.04"),
        ("GET", &["-m", "get"], "/telemetry", "4.05"),
        ("payload over the max", &["-m", "post", "-e", &big], "/e", "4.13"),
    ];
    for (row, args, path, code) in rows {
        let answer = dtls(&s, SENSOR1, args, path).await;
        assert_eq!(answer.code, code, "{row}: {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_payload_needs_a_content_format() {
    let s = start().await;
    let answer = dtls(&s, SENSOR1, CON, "/e").await;
    assert_eq!(answer.code, "4.00", "{answer:?}");
    // With a content format, or marked as Hono's empty notification, it is fine.
    let answer = dtls(&s, SENSOR1, &["-m", "post", "-t", "0"], "/e").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    let answer = dtls(&s, SENSOR1, CON, "/e?empty").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    let mut consumer = s.consumer("event/t1", 2);
    let first = next(&mut consumer).await;
    assert_eq!(first.content_type().as_deref(), Some("text/plain;charset=utf-8"));
    first.settle(Outcome::Accepted);
    let second = next(&mut consumer).await;
    let content_type = second.content_type();
    assert_eq!(content_type.as_deref(), Some("application/vnd.eclipse-hono-empty-notification"));
    second.settle(Outcome::Accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datagram_gets_a_reset_and_the_adapter_keeps_serving() {
    let s = start().await;
    s.registry.set_allow_unauthenticated("t1", true);
    let socket = raw_device().await;
    // CON, message id 0x1234, then an option byte with the reserved length nibble 15.
    let reset = raw_exchange(&socket, s.udp(), &[0x40, 0x02, 0x12, 0x34, 0xbf]).await;
    assert_eq!(
        reset.as_deref(),
        Some(&[0x70, 0x00, 0x12, 0x34][..]),
        "RST with the same message id"
    );
    // Not CoAP at all: silently dropped.
    assert_eq!(raw_exchange(&socket, s.udp(), &[0xff, 0x00]).await, None);
    // Other devices (and this one) keep flowing.
    let answer = udp(&s, &["-m", "put", "-t", "0", "-e", "x"], "/e/t1/d1").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    let answer = dtls(&s, SENSOR1, POST, "/e").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_con_is_sent_downstream_once_and_answered_alike() {
    let s = start().await;
    s.registry.set_allow_unauthenticated("t1", true);
    let socket = raw_device().await;
    let request = raw_put(MessageType::Confirmable, 0x4242, "e", b"once");
    let first = raw_exchange(&socket, s.udp(), &request).await.expect("an answer");
    let second = raw_exchange(&socket, s.udp(), &request).await.expect("the same answer");
    assert_eq!(first, second);
    let response = Packet::from_bytes(&first).unwrap();
    assert_eq!(response.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(response.header.message_id, 0x4242);
    assert_eq!(response.get_token(), &[0xca, 0xfe]);
    assert_eq!(response.header.code, MessageClass::Response(ResponseType::Changed));
    let mut consumer = s.consumer("event/t1", 10);
    next(&mut consumer).await.settle(Outcome::Accepted);
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(consumer.try_recv().is_err(), "exactly one message downstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_request_gets_a_non_response_with_its_own_message_id() {
    let s = start().await;
    s.registry.set_allow_unauthenticated("t1", true);
    let request = raw_put(MessageType::NonConfirmable, 0x0101, "t", b"x");
    let response = raw_answer(&raw_device().await, s.udp(), &request).await;
    assert_eq!(response.header.get_type(), MessageType::NonConfirmable);
    assert_ne!(
        response.header.message_id, 0x0101,
        "RFC 7252 §4.3: a NON carries its own message id"
    );
    assert_eq!(response.get_token(), &[0xca, 0xfe]);
    assert_eq!(response.header.code, MessageClass::Response(ResponseType::Changed));
    assert_eq!(s.downstream.stats.dropped.load(Ordering::Relaxed), 1, "nobody consumed it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_starting_over_from_the_same_port_gets_a_new_session() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let port = raw_device().await.local_addr().unwrap().port().to_string();
    // A device whose session is established and busy, then dies without a close_notify.
    let mut first = coap_client(
        s.dtls(),
        Some(SENSOR1),
        &options(&["-p", &port, "-m", "post", "-e", "1"]),
        "/t",
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("libcoap3-bin is installed");
    let delivery = next(&mut consumer).await;
    first.kill().unwrap();
    first.wait().unwrap();
    delivery.settle(Outcome::Accepted);
    // It comes back from the same address with a new handshake.
    let answer = dtls(&s, SENSOR1, &["-p", &port, "-m", "post", "-t", "0", "-e", "2"], "/e").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_wise_bodies_are_put_together() {
    // libcoap sends anything over 1 KiB in Block1 blocks of 1 KiB.
    let s = start_with(CoapConfig { max_payload: 2048, ..Default::default() }).await;
    s.registry.set_allow_unauthenticated("t1", true);
    let body = "0123456789".repeat(150);
    let answer = udp(&s, &["-m", "put", "-t", "42", "-e", &body], "/e/t1/d1").await;
    assert_eq!(answer.code, "2.04", "plain UDP: {answer:?}");
    let answer = dtls(&s, SENSOR1, &["-m", "post", "-t", "42", "-e", &body], "/e").await;
    assert_eq!(answer.code, "2.04", "DTLS: {answer:?}");
    let too_big = "x".repeat(3000);
    let answer = udp(&s, &["-m", "put", "-t", "42", "-e", &too_big], "/e/t1/d1").await;
    assert_eq!(answer.code, "4.13", "{answer:?}");
    let mut consumer = s.consumer("event/t1", 10);
    for _ in 0..2 {
        let d = next(&mut consumer).await;
        assert_eq!(d.content_type().as_deref(), Some("application/octet-stream"));
        assert_eq!(d.data(), body.as_bytes());
        d.settle(Outcome::Accepted);
    }
    assert!(consumer.try_recv().is_err(), "the oversized body never went downstream");
}

/// A plain-UDP Block1 block (SZX 6: 1 KiB) of a PUT to `/e/t1/d1`.
fn block_request(message_id: u16, num: u32, more: bool, payload: &[u8]) -> Vec<u8> {
    let request = raw_put(MessageType::Confirmable, message_id, "e", payload);
    let mut p = Packet::from_bytes(&request).unwrap();
    let value = (num << 4) | (u32::from(more) << 3) | 6;
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take(3).take_while(|b| **b == 0).count();
    p.add_option(CoapOption::Block1, bytes[skip..].to_vec());
    p.to_bytes().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_blocks_are_kept_only_for_tenants_that_allow_it() {
    // Review H1 / issue 11: on plain UDP a body's first block is checked before it is kept.
    let s = start_with(CoapConfig { max_payload: 4096, ..Default::default() }).await;
    let device = raw_device().await;
    let code = |response: Packet| response.header.code;
    let first = block_request(1, 0, true, &[b'a'; 1024]);
    // t1 does not allow unauthenticated devices: refused at the first block ...
    let answer = code(raw_answer(&device, s.udp(), &first).await);
    assert_eq!(answer, MessageClass::Response(ResponseType::Unauthorized));
    // ... and nothing was kept: the next block finds no transfer to continue.
    let second = block_request(2, 1, false, b"end");
    let answer = code(raw_answer(&device, s.udp(), &second).await);
    assert_eq!(answer, MessageClass::Response(ResponseType::RequestEntityIncomplete));
    // Once the tenant allows it, the same transfer goes through.
    s.registry.set_allow_unauthenticated("t1", true);
    let mut consumer = s.consumer("event/t1", 1);
    let answer =
        code(raw_answer(&device, s.udp(), &block_request(3, 0, true, &[b'a'; 1024])).await);
    assert_eq!(answer, MessageClass::Response(ResponseType::Continue));
    let done = tokio::spawn(async move {
        let d = next(&mut consumer).await;
        d.settle(Outcome::Accepted);
    });
    let answer = code(raw_answer(&device, s.udp(), &block_request(4, 1, false, b"end")).await);
    assert_eq!(answer, MessageClass::Response(ResponseType::Changed));
    done.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded_and_a_slow_answer_comes_separately() {
    let s =
        start_with(CoapConfig { max_in_flight: 1, max_payload: 64, ..Default::default() }).await;
    s.registry.set_allow_unauthenticated("t1", true);
    let mut consumer = s.consumer("telemetry/t1", 10);
    let device = raw_device().await;
    let request = raw_put(MessageType::Confirmable, 0x0a0a, "t", b"slow");
    device.send_to(&request, s.udp()).await.unwrap();
    // Held: the request stays in flight.
    let delivery = next(&mut consumer).await;
    // A retransmission while it is processed is not processed again, nor answered.
    device.send_to(&request, s.udp()).await.unwrap();
    // Another device finds the adapter full: 5.03 at once, nothing downstream.
    let busy = raw_put(MessageType::Confirmable, 1, "t", b"x");
    let answer = raw_answer(&raw_device().await, s.udp(), &busy).await;
    assert_eq!(answer.header.code, MessageClass::Response(ResponseType::ServiceUnavailable));
    assert!(consumer.try_recv().is_err());
    // Still unanswered well before the device's ACK timeout (2 s): one empty ACK (RFC
    // 7252 §5.2.2), which a later retransmission gets again.
    let mut buf = vec![0u8; 2048];
    let mut receive = async || {
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), device.recv_from(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        buf[..n].to_vec()
    };
    let empty_ack = vec![0x60, 0x00, 0x0a, 0x0a];
    assert_eq!(receive().await, empty_ack, "one empty ACK, not one per retransmission");
    assert_eq!(raw_exchange(&device, s.udp(), &request).await, Some(empty_ack));
    // The application accepts: the 2.04 comes as a separate CON with the request's token.
    delivery.settle(Outcome::Accepted);
    let answer = Packet::from_bytes(&receive().await).unwrap();
    assert_eq!(answer.header.get_type(), MessageType::Confirmable);
    assert_eq!(answer.header.code, MessageClass::Response(ResponseType::Changed));
    assert_eq!(answer.get_token(), &[0xca, 0xfe]);
    assert!(consumer.try_recv().is_err(), "exactly one message downstream");
}

/// One epoch-0 DTLS 1.2 handshake record holding `fragments` (offset, byte) of one
/// ClientHello of `length` bytes, one byte each.
fn dtls_fragments(length: usize, fragments: &[(usize, u8)]) -> Vec<u8> {
    let u24 = |n: usize| (n as u32).to_be_bytes()[1..].to_vec();
    let mut body = Vec::new();
    for (offset, byte) in fragments {
        body.push(1);
        body.extend(u24(length));
        body.extend_from_slice(&[0, 0]);
        body.extend(u24(*offset));
        body.extend(u24(1));
        body.push(*byte);
    }
    let mut record = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1];
    record.extend_from_slice(&(body.len() as u16).to_be_bytes());
    record.extend(body);
    record
}

/// Security review C1: ~2.6 MB of one-byte handshake fragments of one message from one
/// address, offset 0 last, made webrtc-dtls's reassembly recurse once per fragment and
/// overflow a worker's stack (the whole process aborted). The front drops fragmented
/// handshake messages before any session exists; devices keep connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dtls_fragment_flood_never_reaches_the_handshake() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let attacker = raw_device().await;
    const LENGTH: usize = 200_000;
    // A whole, valid-looking ClientHello first would open a session; then the fragments.
    let mut offsets: Vec<usize> = (1..LENGTH).collect();
    offsets.push(0);
    for chunk in offsets.chunks(1000) {
        let fragments: Vec<(usize, u8)> = chunk.iter().map(|o| (*o, 0)).collect();
        let record = dtls_fragments(LENGTH, &fragments);
        attacker.send_to(&record, s.dtls()).await.unwrap();
        // Loopback drops what the receive buffer cannot hold: pace a little.
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let answer = dtls(&s, SENSOR1, &["-m", "post", "-e", "still here"], "/t").await;
    assert_eq!(answer.code, "2.04", "{answer:?}");
    next(&mut consumer).await;
}
