//! The message type that travels through the core, and the delivery outcomes.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use fe2o3_amqp_types::messaging::{
    message::{__private::Serializable, DecodeIntoMessage},
    Body,
};
use fe2o3_amqp_types::primitives::Value;

/// An AMQP 1.0 message with any body section. Adapters build these directly (no encoding
/// on the in-process path); the AMQP listener decodes them from the wire.
pub type Message = fe2o3_amqp_types::messaging::Message<Body<Value>>;

/// A message with one Data section and no other sections.
pub fn data_message(payload: impl Into<Vec<u8>>) -> Message {
    let data = fe2o3_amqp_types::messaging::Data(payload.into().into());
    with_body(Body::Data(fe2o3_amqp_types::messaging::Batch::new(vec![data])))
}

/// A message with the given body and no other sections.
pub fn with_body(body: Body<Value>) -> Message {
    Message {
        header: None,
        delivery_annotations: None,
        message_annotations: None,
        properties: None,
        application_properties: None,
        body,
        footer: None,
    }
}

/// Encodes a message in AMQP 1.0 wire format (for the durable store).
pub fn encode(message: &Message) -> Result<Vec<u8>, serde_amqp::Error> {
    serde_amqp::to_vec(&Serializable(message))
}

/// Decodes what [`encode`] wrote.
pub fn decode(bytes: &[u8]) -> Result<Message, serde_amqp::Error> {
    Body::<Value>::decode_message_from_reader(serde_amqp::read::SliceReader::new(bytes))
}

/// The bytes of a message's body sections (an estimate for non-binary bodies): what
/// buffers of messages in memory count.
pub fn body_size(message: &Message) -> usize {
    match &message.body {
        Body::Data(batch) => batch.iter().map(|data| data.0.len()).sum(),
        Body::Sequence(batch) => batch.len() * 64,
        Body::Value(_) | Body::Empty => 64,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// When the message expires (ms since the epoch), from its header `ttl` (relative to
/// `arrival`) or its `absolute-expiry-time`, whichever comes first.
pub fn expiry_of(message: &Message, arrival: u64) -> Option<u64> {
    let by_ttl = message.header.as_ref().and_then(|h| h.ttl).map(|ttl| arrival + ttl as u64);
    let absolute = message
        .properties
        .as_ref()
        .and_then(|p| p.absolute_expiry_time.as_ref())
        .map(|t| t.milliseconds().max(0) as u64);
    match (by_ttl, absolute) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The final state of a delivery, as AMQP 1.0 defines it (§3.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Taken: by a consumer (direct addresses) or onto disk (queues and topics).
    Accepted,
    /// Not processed; the sender may try again (no consumer, no credit, link gone).
    Released,
    /// Refused as invalid or unroutable; `condition` is an AMQP error condition symbol.
    Rejected { condition: &'static str, description: String },
    /// Not processed by this consumer; redelivered, counting a failed delivery if asked.
    Modified { delivery_failed: bool, undeliverable_here: bool },
}

impl Outcome {
    pub fn rejected(condition: &'static str, description: impl Into<String>) -> Self {
        Outcome::Rejected { condition, description: description.into() }
    }

    pub fn is_accepted(&self) -> bool {
        matches!(self, Outcome::Accepted)
    }
}

/// AMQP error condition symbols used by the core.
pub mod condition {
    pub const NOT_FOUND: &str = "amqp:not-found";
    pub const UNAUTHORIZED_ACCESS: &str = "amqp:unauthorized-access";
    pub const RESOURCE_LIMIT_EXCEEDED: &str = "amqp:resource-limit-exceeded";
    pub const INTERNAL_ERROR: &str = "amqp:internal-error";
    pub const INVALID_FIELD: &str = "amqp:invalid-field";
    pub const NOT_ALLOWED: &str = "amqp:not-allowed";
    pub const DECODE_ERROR: &str = "amqp:decode-error";
}

/// The outcome of a send, now or later.
pub enum Submission {
    Ready(Outcome),
    Pending(oneshot::Receiver<Outcome>),
    /// Held by an anycast address until a consumer has credit (see `direct.rs`).
    Held(Held),
}

/// A message an anycast address holds for a consumer's credit, at most `until`: then
/// `released` unless a consumer took it meanwhile.
pub struct Held {
    pub(crate) rx: oneshot::Receiver<Outcome>,
    pub(crate) until: std::time::Instant,
    pub(crate) node: std::sync::Weak<dyn GiveUp>,
    pub(crate) id: u64,
}

/// Where a held message waits (an anycast node).
pub(crate) trait GiveUp: Send + Sync {
    /// Its producer stopped waiting for held message `id` (the bound passed): `released`,
    /// unless a consumer already has it.
    fn give_up(&self, id: u64);
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Submission::Ready(outcome) => f.debug_tuple("Ready").field(outcome).finish(),
            Submission::Pending(_) => f.write_str("Pending"),
            Submission::Held(held) => f.debug_struct("Held").field("until", &held.until).finish(),
        }
    }
}

impl Submission {
    /// Waits for the outcome. A pending outcome whose delivery vanished (consumer gone,
    /// shutdown) is `released`.
    ///
    /// # Cancel safety
    /// Cancelling it does not cancel the send; only the outcome is lost.
    pub async fn outcome(self) -> Outcome {
        match self {
            Submission::Ready(outcome) => outcome,
            Submission::Pending(rx) => rx.await.unwrap_or(Outcome::Released),
            Submission::Held(Held { mut rx, until, node, id }) => {
                match tokio::time::timeout_at(until.into(), &mut rx).await {
                    Ok(outcome) => outcome.unwrap_or(Outcome::Released),
                    Err(_elapsed) => {
                        if let Some(node) = node.upgrade() {
                            node.give_up(id);
                        }
                        rx.await.unwrap_or(Outcome::Released)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{Header, Properties};

    #[test]
    fn round_trip_and_expiry() {
        let mut message = data_message(vec![1u8, 2, 3]);
        message.header = Some(Header { durable: true, ttl: Some(1000), ..Default::default() });
        message.properties =
            Some(Properties { message_id: Some(7u64.into()), ..Default::default() });
        let bytes = encode(&message).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back, message);
        assert_eq!(expiry_of(&back, 5_000), Some(6_000));
    }
}
