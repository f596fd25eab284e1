//! The application's side of the tests: what a consumer receives (and what it must not),
//! the properties Hono puts on messages, commands as an application sends them, and the
//! devices' `ttd` notifications.

use std::time::Duration;

use fe2o3_amqp::types::messaging::{Body, MessageId, Properties};
use fe2o3_amqp::types::primitives::SimpleValue;
use ferrule_messaging::message::data_message;
use ferrule_messaging::{Consumer, Delivery, Message, Outcome};

/// The next delivery (10 s at the most).
pub async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .expect("a message in time")
        .expect("open")
}

/// Asserts that nothing arrives for a while (after a refused publish).
pub async fn nothing(consumer: &mut Consumer) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), consumer.recv()).await {
        panic!("unexpected message: {:?}", d.message());
    }
}

/// A string application property as [`MessageExt::app_property`] returns it.
pub fn text(value: &str) -> Option<SimpleValue> {
    Some(SimpleValue::String(value.into()))
}

/// What the tests read from a message, the same on a [`Message`] and a [`Delivery`].
pub trait MessageExt {
    fn msg(&self) -> &Message;

    fn app_property(&self, key: &str) -> Option<SimpleValue> {
        self.msg().application_properties.as_ref()?.0.get(key).cloned()
    }

    /// The bytes of the Data sections.
    fn data(&self) -> Vec<u8> {
        match &self.msg().body {
            Body::Data(batch) => batch.iter().flat_map(|data| data.0.to_vec()).collect(),
            other => panic!("not a data body: {other:?}"),
        }
    }

    fn content_type(&self) -> Option<String> {
        self.msg().properties.as_ref()?.content_type.as_ref().map(|c| c.as_str().to_owned())
    }

    fn correlation_id(&self) -> Option<MessageId> {
        self.msg().properties.as_ref()?.correlation_id.clone()
    }

    /// The header's time to live in milliseconds.
    fn ttl(&self) -> Option<u32> {
        self.msg().header.as_ref()?.ttl
    }

    fn durable(&self) -> bool {
        self.msg().header.as_ref().is_some_and(|h| h.durable)
    }
}

impl MessageExt for Message {
    fn msg(&self) -> &Message {
        self
    }
}

impl MessageExt for Delivery {
    fn msg(&self) -> &Message {
        self.message()
    }
}

/// A command as an application sends it to `command/t1/DEVICE` (text/plain);
/// `reply` = (reply id, message id) makes it request/response to
/// `command_response/t1/REPLY-ID`, `None` one-way.
pub fn command(device: &str, name: &str, payload: &str, reply: Option<(&str, &str)>) -> Message {
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

/// The next command response on `responses`, asserted to answer the command with message
/// id `correlation` for `device` with `status`; not settled yet.
pub async fn next_response(
    responses: &mut Consumer,
    correlation: &str,
    status: i32,
    device: &str,
) -> Delivery {
    let response = next(responses).await;
    assert_eq!(response.correlation_id(), Some(MessageId::String(correlation.into())));
    assert_eq!(response.app_property("status"), Some(SimpleValue::Int(status)));
    assert_eq!(response.app_property("device_id"), text(device));
    response
}

/// The next `ttd` notification on `events` as (device, ttd), asserting it came from
/// `adapter` (`hono-mqtt`, ...); other events are accepted and skipped.
async fn next_ttd(events: &mut Consumer, adapter: &str) -> (String, i32) {
    loop {
        let d = next(events).await;
        let notification = match (d.app_property("ttd"), d.app_property("device_id")) {
            (Some(SimpleValue::Int(ttd)), Some(SimpleValue::String(device))) => Some((device, ttd)),
            _ => None,
        };
        let origin = d.app_property("orig_adapter");
        d.settle(Outcome::Accepted);
        if let Some(notification) = notification {
            assert_eq!(origin, text(adapter), "{notification:?}");
            return notification;
        }
    }
}

/// The `ttd` of the next notification for `device` (others skipped).
pub async fn ttd(events: &mut Consumer, adapter: &str, device: &str) -> i32 {
    loop {
        let (from, ttd) = next_ttd(events, adapter).await;
        if from == device {
            return ttd;
        }
    }
}

/// Waits until each of `devices` has announced that it waits for a command (`ttd` > 0).
pub async fn ready(events: &mut Consumer, adapter: &str, devices: &[&str]) {
    let mut missing = devices.to_vec();
    while !missing.is_empty() {
        let (device, ttd) = next_ttd(events, adapter).await;
        if ttd > 0 {
            missing.retain(|d| *d != device);
        }
    }
}
