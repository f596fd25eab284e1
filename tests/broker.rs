//! The messaging core's in-process API (what the protocol adapters use): routing,
//! credit, queue semantics. The AMQP side is covered by tests/interop with a real client.

use std::time::Duration;

use fe2o3_amqp::types::messaging::{Body, Header};
use ferrule_messaging::address::{AddressRule, AddressType};
use ferrule_messaging::message::{data_message, Message};
use ferrule_messaging::{Broker, MessagingConfig, Outcome, SubscribeOptions};

fn config() -> MessagingConfig {
    MessagingConfig {
        queue_max_depth: 3,
        addresses: vec![AddressRule::new("news/*", AddressType::Topic)],
        ..Default::default()
    }
}

fn payload(message: &Message) -> Vec<u8> {
    match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
        other => panic!("unexpected body {other:?}"),
    }
}

async fn next(consumer: &mut ferrule_messaging::Consumer) -> ferrule_messaging::Delivery {
    tokio::time::timeout(Duration::from_secs(5), consumer.recv())
        .await
        .expect("a delivery in time")
        .expect("open")
}

/// Grants `consumer` credit and checks that nothing comes for a while.
async fn assert_nothing_arrives(consumer: &mut ferrule_messaging::Consumer, why: &str) {
    consumer.add_credit(1);
    let got = tokio::time::timeout(Duration::from_millis(300), consumer.recv()).await;
    assert!(got.is_err(), "{why}");
}

#[tokio::test]
async fn anycast_needs_a_consumer_with_credit() {
    // Without a wait for busy consumers (see the `held_*` tests for the default).
    let broker = Broker::in_memory(&MessagingConfig { consumer_wait: Duration::ZERO, ..config() });
    assert_eq!(
        broker.send("telemetry/t1", data_message("x")).await,
        Outcome::Released,
        "no consumer"
    );

    let mut consumer = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    assert_eq!(
        broker.send("telemetry/t1", data_message("x")).await,
        Outcome::Released,
        "no credit"
    );

    consumer.add_credit(1);
    let pending = broker.submit("telemetry/t1", data_message("hello"), false);
    let delivery = next(&mut consumer).await;
    assert_eq!(payload(delivery.message()), b"hello");
    delivery.settle(Outcome::rejected("amqp:invalid-field", "bad"));
    assert!(
        matches!(pending.outcome().await, Outcome::Rejected { .. }),
        "consumer's outcome reaches the producer"
    );

    // Credit was used up: with no wait configured the next message is released at once.
    assert_eq!(broker.send("telemetry/t1", data_message("y")).await, Outcome::Released);
}

fn holding(wait: Duration, bytes: usize) -> Broker {
    Broker::in_memory(&MessagingConfig {
        consumer_wait: wait,
        consumer_wait_bytes: bytes,
        ..config()
    })
}

#[tokio::test]
async fn held_for_a_busy_consumer_until_it_has_credit_in_order() {
    let broker = holding(Duration::from_secs(30), 1 << 20);
    let mut consumer = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    let producers: Vec<_> =
        (0..3u8).map(|i| broker.submit("telemetry/t1", data_message(vec![i]), false)).collect();
    assert!(
        producers.iter().all(|p| matches!(p, ferrule_messaging::Submission::Held(_))),
        "a consumer is attached but has no credit: held, not released"
    );
    let outcomes = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for p in producers {
            outcomes.push(p.outcome().await);
        }
        outcomes
    });
    // Pre-settled (QoS 0) messages queue behind them; their producer waits too, until a
    // consumer has the message (so that a flooding device is slowed, not dropped).
    let presettled = broker.submit("telemetry/t1", data_message(vec![3]), true);
    assert!(matches!(presettled, ferrule_messaging::Submission::Held(_)));
    let presettled = tokio::spawn(presettled.outcome());
    consumer.add_credit(4);
    for i in 0..4u8 {
        let delivery = next(&mut consumer).await;
        assert_eq!(payload(delivery.message()), [i], "arrival order");
        delivery.settle(Outcome::Accepted);
    }
    assert_eq!(outcomes.await.unwrap(), vec![Outcome::Accepted; 3], "the consumer's outcomes");
    assert_eq!(presettled.await.unwrap(), Outcome::Accepted, "handed to the consumer");
}

#[tokio::test]
async fn held_past_the_wait_bound_is_released_and_never_delivered() {
    let broker = holding(Duration::from_millis(200), 1 << 20);
    let mut consumer = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(broker.send("telemetry/t1", data_message("late")).await, Outcome::Released);
    assert!(started.elapsed() >= Duration::from_millis(200), "it waited for the bound");
    assert_nothing_arrives(
        &mut consumer,
        "a message its producer was told is released must not arrive after all",
    )
    .await;
}

#[tokio::test]
async fn held_messages_are_bounded_in_bytes() {
    // Room for two 100-byte messages (each counts its payload plus 512).
    let broker = holding(Duration::from_secs(30), 2 * 612);
    let consumer = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    let first = broker.submit("telemetry/t1", data_message(vec![0; 100]), false);
    let second = broker.submit("telemetry/t1", data_message(vec![1; 100]), false);
    assert!(matches!(second, ferrule_messaging::Submission::Held(_)));
    assert!(
        matches!(
            broker.submit("telemetry/t1", data_message(vec![2; 100]), false),
            ferrule_messaging::Submission::Ready(Outcome::Released)
        ),
        "over the bound: released at once"
    );
    // The last consumer leaving releases what waited for it, at once.
    drop(consumer);
    assert_eq!(first.outcome().await, Outcome::Released);
    assert_eq!(second.outcome().await, Outcome::Released);
}

#[tokio::test]
async fn anycast_delivery_dropped_by_a_vanishing_consumer_is_released() {
    let broker = Broker::in_memory(&config());
    let mut consumer = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(5);
    let pending = broker.submit("telemetry/t1", data_message("x"), false);
    let delivery = next(&mut consumer).await;
    drop(delivery);
    assert_eq!(pending.outcome().await, Outcome::Released);
    let pending = broker.submit("telemetry/t1", data_message("queued in the consumer"), false);
    drop(consumer);
    assert_eq!(pending.outcome().await, Outcome::Released);
}

#[tokio::test]
async fn competing_consumers_share_anycast_round_robin() {
    let broker = Broker::in_memory(&config());
    let mut a = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    let mut b = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    a.add_credit(100);
    b.add_credit(100);
    for i in 0..10u8 {
        assert!(matches!(
            broker.submit("telemetry/t1", data_message(vec![i]), true),
            ferrule_messaging::Submission::Ready(Outcome::Accepted)
        ));
    }
    let mut got = Vec::new();
    for consumer in [&mut a, &mut b] {
        let mut n = 0;
        while let Ok(delivery) = consumer.try_recv() {
            got.extend(payload(delivery.message()));
            n += 1;
        }
        assert!(n > 0, "each consumer gets some");
    }
    got.sort();
    assert_eq!(got, (0..10).collect::<Vec<u8>>());
}

#[tokio::test]
async fn queue_keeps_order_redelivers_and_bounds_depth() {
    let broker = Broker::in_memory(&config());
    for i in 0..3u8 {
        assert_eq!(broker.send("event/t1", data_message(vec![i])).await, Outcome::Accepted);
    }
    match broker.send("event/t1", data_message("too many")).await {
        Outcome::Rejected { condition, description } => {
            assert_eq!(condition, "amqp:resource-limit-exceeded");
            assert!(description.contains("full"), "{description}");
        }
        other => panic!("expected rejected, got {other:?}"),
    }
    assert_eq!(broker.queue_depth("event/t1"), Some(3));

    let mut consumer = broker.subscribe("event/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(1);
    let first = next(&mut consumer).await;
    assert_eq!(payload(first.message()), [0]);
    first.settle(Outcome::Modified { delivery_failed: true, undeliverable_here: false });
    consumer.add_credit(1);
    let again = next(&mut consumer).await;
    assert_eq!(payload(again.message()), [0], "redelivered first, in order");
    assert_eq!(again.delivery_count(), 1);
    again.settle(Outcome::Accepted);
    consumer.add_credit(2);
    let (d1, d2) = (next(&mut consumer).await, next(&mut consumer).await);
    assert_eq!((payload(d1.message()), payload(d2.message())), (vec![1], vec![2]));
    drop(consumer); // d1 and d2 unsettled: they stay in the queue
    drop((d1, d2));
    assert_eq!(broker.queue_depth("event/t1"), Some(2));
}

#[tokio::test]
async fn rejected_and_expired_messages_are_dead_lettered() {
    let broker = Broker::in_memory(&MessagingConfig::default());
    let mut short = data_message("short-lived");
    short.header = Some(Header { ttl: Some(50), ..Default::default() });
    assert_eq!(broker.send("event/t1", short).await, Outcome::Accepted);
    assert_eq!(broker.send("event/t1", data_message("bad")).await, Outcome::Accepted);
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.sweep_expired();

    let mut consumer = broker.subscribe("event/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(10);
    let bad = next(&mut consumer).await;
    assert_eq!(payload(bad.message()), b"bad", "the expired message is not delivered");
    bad.settle(Outcome::rejected("amqp:invalid-field", "no"));

    let mut dlq = broker.subscribe("event/t1/dlq", &SubscribeOptions::default()).unwrap();
    dlq.add_credit(10);
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let d = next(&mut dlq).await;
        let annotations = d.message().message_annotations.as_ref().expect("annotated");
        let reason = annotations
            .0
            .iter()
            .find(|(k, _)| format!("{k:?}").contains("dead-letter-reason"))
            .map(|(_, v)| format!("{v:?}"))
            .expect("reason");
        reasons.push((payload(d.message()), reason));
        d.settle(Outcome::Accepted);
    }
    reasons.sort();
    assert!(reasons[0].0 == b"bad" && reasons[0].1.contains("rejected"), "{reasons:?}");
    assert!(reasons[1].0 == b"short-lived" && reasons[1].1.contains("expired"), "{reasons:?}");
}

#[tokio::test]
async fn topic_durable_subscription_outlives_its_consumer() {
    let broker = Broker::in_memory(&config());
    let durable = SubscribeOptions { durable_name: Some("sub-1".into()) };
    let consumer = broker.subscribe("news/t1", &durable).unwrap();
    drop(consumer);
    assert_eq!(broker.send("news/t1", data_message("while away")).await, Outcome::Accepted);
    let mut consumer = broker.subscribe("news/t1", &durable).unwrap();
    consumer.add_credit(1);
    let d = next(&mut consumer).await;
    assert_eq!(payload(d.message()), b"while away");
    d.settle(Outcome::Accepted);
    consumer.close_on_drop();
    drop(consumer);
    broker.send("news/t1", data_message("after close")).await;
    let mut consumer = broker.subscribe("news/t1", &durable).unwrap();
    assert_nothing_arrives(&mut consumer, "closed subscription was deleted").await;
}

#[tokio::test]
async fn unknown_addresses_are_refused() {
    let broker = Broker::in_memory(&config());
    assert!(matches!(
        broker.send("nowhere/t1", data_message("x")).await,
        Outcome::Rejected { condition: "amqp:not-found", .. }
    ));
    assert!(broker.subscribe("nowhere/t1", &SubscribeOptions::default()).is_err());
}

#[tokio::test]
async fn only_hono_shapes_exist_below_the_tenant() {
    let broker = Broker::in_memory(&config());
    for address in ["telemetry/t1/5f0c", "event/t1/anything", "command_response/t1"] {
        assert!(
            matches!(
                broker.send(address, data_message("x")).await,
                Outcome::Rejected { condition: "amqp:not-found", .. }
            ),
            "{address}"
        );
        assert!(broker.subscribe(address, &SubscribeOptions::default()).is_err(), "{address}");
    }
    assert_eq!(broker.node_count(), 0, "nothing was created for them");
}

#[tokio::test]
async fn reply_addresses_that_come_and_go_do_not_add_up() {
    let broker =
        Broker::in_memory(&MessagingConfig { max_addresses_per_tenant: 20_000, ..config() });
    let mut telemetry = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    let mut kept =
        broker.subscribe("command_response/t1/kept", &SubscribeOptions::default()).unwrap();
    for i in 0..10_000 {
        let address = format!("command_response/t1/reply-{i}");
        let consumer = broker.subscribe(&address, &SubscribeOptions::default()).unwrap();
        drop(consumer);
        // Nobody listens any more: released, as for any address without a consumer.
        assert_eq!(broker.send(&address, data_message("late")).await, Outcome::Released);
    }
    drop(broker.subscribe_dynamic("t1").expect("under the address limit"));
    assert_eq!(broker.node_count(), 10_003);
    assert_eq!(broker.collect_idle(), 10_001, "the idle reply and dynamic addresses");
    assert_eq!(broker.node_count(), 2);

    // What remains works; telemetry/t1 is kept even without consumers (one per tenant).
    drop(telemetry);
    assert_eq!(broker.collect_idle(), 0);
    telemetry = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    telemetry.add_credit(1);
    broker.submit("telemetry/t1", data_message("t"), true);
    assert_eq!(payload(next(&mut telemetry).await.message()), b"t");
    kept.add_credit(1);
    let sent = broker.submit("command_response/t1/kept", data_message("r"), false);
    let delivery = next(&mut kept).await;
    delivery.settle(Outcome::Accepted);
    assert_eq!(sent.outcome().await, Outcome::Accepted);

    // A collected address is made again on use.
    let mut again =
        broker.subscribe("command_response/t1/reply-7", &SubscribeOptions::default()).unwrap();
    again.add_credit(1);
    let sent = broker.submit("command_response/t1/reply-7", data_message("again"), false);
    next(&mut again).await.settle(Outcome::Accepted);
    assert_eq!(sent.outcome().await, Outcome::Accepted);
}

#[tokio::test]
async fn a_tenant_has_a_bounded_number_of_addresses() {
    let broker = Broker::in_memory(&MessagingConfig { max_addresses_per_tenant: 4, ..config() });
    let telemetry = broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    let replies: Vec<_> = (0..3)
        .map(|i| {
            let address = format!("command_response/t1/r{i}");
            broker.subscribe(&address, &SubscribeOptions::default()).expect("under the limit")
        })
        .collect();
    assert_eq!(broker.tenant_address_count("t1"), 4);
    let refused = broker.subscribe("command_response/t1/r3", &SubscribeOptions::default());
    match refused {
        Err(e) => {
            assert_eq!(e.condition(), "amqp:resource-limit-exceeded");
            assert!(e.to_string().contains("limit of 4 addresses"), "{e}");
        }
        Ok(_) => panic!("a fifth address was made"),
    }
    assert!(broker.subscribe_dynamic("t1").is_err(), "dynamic addresses count too");
    // A message for a reply address nobody made is released and makes nothing; one that
    // would make a new queue is refused.
    assert_eq!(broker.send("command_response/t1/r4", data_message("x")).await, Outcome::Released);
    match broker.send("event/t1", data_message("x")).await {
        Outcome::Rejected { condition, .. } => {
            assert_eq!(condition, "amqp:resource-limit-exceeded")
        }
        other => panic!("expected rejected, got {other:?}"),
    }
    // Existing addresses still work, and other tenants have their own count.
    assert_eq!(broker.send("command_response/t1/r0", data_message("x")).await, Outcome::Released);
    let other = broker.subscribe("command_response/t2/r0", &SubscribeOptions::default());
    assert!(other.is_ok(), "t2 is not limited by t1's addresses");
    // Idle reply addresses are forgotten: the tenant may make new ones.
    drop((replies, other));
    assert_eq!(broker.collect_idle(), 4, "three of t1 and one of t2");
    assert_eq!(broker.tenant_address_count("t1"), 1, "telemetry/t1 stays");
    assert!(broker.subscribe("command_response/t1/r3", &SubscribeOptions::default()).is_ok());
    drop(telemetry);
}

#[tokio::test]
async fn queues_are_bounded_in_bytes_per_queue_and_per_tenant() {
    // Each 1,000-byte message counts 1,512 bytes (its body and 512 of overhead).
    let broker = Broker::in_memory(&MessagingConfig {
        queue_max_bytes: 4_000,
        tenant_max_queue_bytes: 5_000,
        ..Default::default()
    });
    let kilo = || data_message(vec![7u8; 1000]);
    let full = |outcome: Outcome, what: &str| match outcome {
        Outcome::Rejected { condition, description } => {
            assert_eq!(condition, "amqp:resource-limit-exceeded");
            assert!(description.contains(what), "{description}");
        }
        other => panic!("expected rejected, got {other:?}"),
    };
    assert_eq!(broker.send("event/t1", kilo()).await, Outcome::Accepted);
    assert_eq!(broker.send("event/t1", kilo()).await, Outcome::Accepted);
    full(broker.send("event/t1", kilo()).await, "4000 bytes");
    assert_eq!(broker.send("event/t1/dlq", kilo()).await, Outcome::Accepted);
    full(broker.send("event/t1/dlq", kilo()).await, "tenant's queues are full");
    // Another tenant has its own budget.
    for _ in 0..2 {
        assert_eq!(broker.send("event/t2", kilo()).await, Outcome::Accepted);
    }
    // A consumed message gives its bytes back.
    let mut consumer = broker.subscribe("event/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(1);
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(broker.send("event/t1/dlq", kilo()).await, Outcome::Accepted);
    assert_eq!(broker.queue_depth("event/t1"), Some(1));
}

#[tokio::test]
async fn below_the_free_disk_floor_queues_refuse_with_backpressure() {
    let dir = tempfile::tempdir().unwrap();
    let event = || {
        let mut m = data_message("e");
        m.header = Some(Header { durable: true, ..Default::default() });
        m
    };
    // A floor above any disk: nothing new is stored, the refusal is backpressure.
    let low = MessagingConfig { min_free_disk: u64::MAX, ..config() };
    let broker = Broker::open(&low, dir.path()).unwrap();
    match broker.send("event/t1", event()).await {
        Outcome::Rejected { condition, description } => {
            assert_eq!(condition, "amqp:resource-limit-exceeded");
            assert!(description.contains("disk space is low"), "{description}");
        }
        other => panic!("stored below the floor: {other:?}"),
    }
    assert_eq!(broker.queue_depth("event/t1"), Some(0));
    assert!(broker.storage_healthy(), "low disk is backpressure, not a storage failure");
    broker.close().await.unwrap();
    drop(broker);

    // The same directory without the floor stores again.
    let broker = Broker::open(&config(), dir.path()).unwrap();
    assert_eq!(broker.send("event/t1", event()).await, Outcome::Accepted);
    assert_eq!(broker.queue_depth("event/t1"), Some(1));
    broker.close().await.unwrap();
}
