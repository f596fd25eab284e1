//! Hostile AMQP input against a real listener: a message nested 50,000 levels deep
//! (serde_amqp decodes recursively: before the frame guard this aborted the whole
//! process with a stack overflow), sent over a raw socket as two frames.

use std::time::Duration;

use fe2o3_amqp::types::definitions::{ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Source, Target};
use fe2o3_amqp::types::performatives::{Attach, Begin};
use fe2o3_amqp::types::primitives::Symbol;
use fe2o3_amqp::types::sasl::SaslInit;
use ferrule_messaging::{AmqpServer, Broker, MessagingConfig, SaslConfig, SubscribeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn frame(kind: u8, channel: u16, performative: &[u8], payload: &[u8]) -> Vec<u8> {
    let size = 8 + performative.len() + payload.len();
    let mut out = (size as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&[2, kind]);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(performative);
    out.extend_from_slice(payload);
    out
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_amqp::to_vec(value).expect("encodes")
}

/// An amqp-value section holding a list nested `depth` levels deep, built iteratively.
fn nested_value(depth: usize) -> Vec<u8> {
    [&[0x00, 0x53, 0x77][..], &ferrule_messaging::fuzzing::nested_lists(depth)].concat()
}

fn transfer(more: bool) -> Vec<u8> {
    ferrule_messaging::fuzzing::transfer_performative(0, more)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_message_ends_the_connection_not_the_process() {
    let config = MessagingConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        sasl: SaslConfig { allow_anonymous: true, users: Vec::new() },
        ..Default::default()
    };
    let broker = Broker::in_memory(&config);
    let server = AmqpServer::bind(&config, broker.clone()).await.expect("binds");
    let addr = server.listeners().local_addr();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(shutdown.clone()));
    let mut consumer =
        broker.subscribe("telemetry/t1", &SubscribeOptions::default()).expect("subscribes");
    consumer.add_credit(10);

    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connects");
    let mut out = b"AMQP\x03\x01\x00\x00".to_vec();
    let init =
        SaslInit { mechanism: Symbol::from("ANONYMOUS"), initial_response: None, hostname: None };
    out.extend(frame(1, 0, &encode(&init), &[]));
    out.extend_from_slice(b"AMQP\x00\x01\x00\x00");
    let open = ferrule_messaging::fuzzing::open_performative("attacker");
    out.extend(frame(0, 0, &open, &[]));
    let begin = Begin {
        remote_channel: None,
        next_outgoing_id: 0,
        incoming_window: 100,
        outgoing_window: 100,
        handle_max: 8.into(),
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    out.extend(frame(0, 0, &encode(&begin), &[]));
    let attach = Attach {
        name: "deep".into(),
        handle: 0.into(),
        role: Role::Sender,
        snd_settle_mode: SenderSettleMode::Unsettled,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(Source::builder().build())),
        target: Some(Box::new(Target::builder().address("telemetry/t1").build().into())),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: Some(0),
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    out.extend(frame(0, 0, &encode(&attach), &[]));
    socket.write_all(&out).await.expect("writes");
    // Let the server attach the link and grant credit before the transfer comes.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 10,000 levels (90 KB) in two frames under the 64 KiB frame limit.
    let payload = nested_value(10_000);
    let (first, second) = payload.split_at(payload.len() / 2);
    let mut out = frame(0, 0, &transfer(true), first);
    out.extend(frame(0, 0, &transfer(false), second));
    socket.write_all(&out).await.expect("writes");

    // The server ends the connection (EOF or reset) instead of decoding the message.
    let mut sink = vec![0u8; 64 * 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was not ended by the server");
    assert!(consumer.try_recv().is_err(), "nothing of the refused message reached the consumer");

    // The process and the listener are fine: a normal client still delivers.
    let mut connection = fe2o3_amqp::Connection::builder()
        .container_id("legit")
        .sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Anonymous)
        .open(format!("amqp://{addr}").as_str())
        .await
        .expect("a normal client connects");
    let mut session = fe2o3_amqp::Session::begin(&mut connection).await.expect("session");
    let mut sender =
        fe2o3_amqp::Sender::attach(&mut session, "ok", "telemetry/t1").await.expect("sender");
    let receive = async {
        let delivery =
            tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await.expect("delivered");
        delivery.expect("open").settle(ferrule_messaging::Outcome::Accepted);
    };
    let (outcome, ()) =
        tokio::join!(sender.send(fe2o3_amqp::types::messaging::Message::from("fine")), receive);
    outcome.expect("sent").accepted_or("accepted").expect("accepted");
    sender.close().await.ok();
    session.end().await.ok();
    connection.close().await.ok();
    shutdown.cancel();
}
