//! Command request ids that carry their own routing: any adapter instance can turn a
//! device's response back into an AMQP message for the right application, without shared
//! state. The id is base64url (safe in MQTT topic levels, HTTP headers and CoAP paths) of
//! `tag | correlation-id length (u8) | correlation-id | reply id`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fe2o3_amqp::types::messaging::MessageId;
use fe2o3_amqp::types::primitives::{Binary, Uuid};

/// What a request id holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    /// Correlation id of the command (Hono: its correlation-id, else its message-id).
    pub correlation_id: MessageId,
    /// The part of the reply address after `command_response/TENANT/`.
    pub reply_id: String,
}

/// Why a request id is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestIdError {
    #[error("request id is not valid base64url")]
    Encoding,
    #[error("request id is truncated or malformed")]
    Malformed,
    #[error("correlation id longer than 255 bytes")]
    TooLong,
}

const STRING: u8 = 0;
const ULONG: u8 = 1;
const UUID: u8 = 2;
const BINARY: u8 = 3;

impl RequestId {
    pub fn encode(&self) -> Result<String, RequestIdError> {
        let (tag, bytes): (u8, Vec<u8>) = match &self.correlation_id {
            MessageId::String(s) => (STRING, s.as_bytes().to_vec()),
            MessageId::Ulong(n) => (ULONG, n.to_be_bytes().to_vec()),
            MessageId::Uuid(u) => (UUID, u.as_inner().to_vec()),
            MessageId::Binary(b) => (BINARY, b.to_vec()),
        };
        let len = u8::try_from(bytes.len()).map_err(|_| RequestIdError::TooLong)?;
        let mut raw = Vec::with_capacity(2 + bytes.len() + self.reply_id.len());
        raw.push(tag);
        raw.push(len);
        raw.extend_from_slice(&bytes);
        raw.extend_from_slice(self.reply_id.as_bytes());
        Ok(URL_SAFE_NO_PAD.encode(raw))
    }

    pub fn decode(text: &str) -> Result<Self, RequestIdError> {
        let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| RequestIdError::Encoding)?;
        let (&tag, rest) = raw.split_first().ok_or(RequestIdError::Malformed)?;
        let (&len, rest) = rest.split_first().ok_or(RequestIdError::Malformed)?;
        let len = len as usize;
        if rest.len() < len {
            return Err(RequestIdError::Malformed);
        }
        let (corr, reply) = rest.split_at(len);
        let correlation_id = match tag {
            STRING => MessageId::String(
                String::from_utf8(corr.to_vec()).map_err(|_| RequestIdError::Malformed)?,
            ),
            ULONG => MessageId::Ulong(u64::from_be_bytes(
                corr.try_into().map_err(|_| RequestIdError::Malformed)?,
            )),
            UUID => MessageId::Uuid(Uuid::from(
                <[u8; 16]>::try_from(corr).map_err(|_| RequestIdError::Malformed)?,
            )),
            BINARY => MessageId::Binary(Binary::from(corr.to_vec())),
            _ => return Err(RequestIdError::Malformed),
        };
        let reply_id = String::from_utf8(reply.to_vec()).map_err(|_| RequestIdError::Malformed)?;
        if reply_id.is_empty() {
            return Err(RequestIdError::Malformed);
        }
        Ok(RequestId { correlation_id, reply_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_id_type() {
        for correlation_id in [
            MessageId::String("abc-123".into()),
            MessageId::Ulong(42),
            MessageId::Uuid(Uuid::from([7u8; 16])),
            MessageId::Binary(Binary::from(vec![0u8, 255, 3])),
        ] {
            let id = RequestId { correlation_id, reply_id: "app-1/x".into() };
            let text = id.encode().unwrap();
            assert!(
                text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{text}"
            );
            assert_eq!(RequestId::decode(&text).unwrap(), id);
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(RequestId::decode("!!"), Err(RequestIdError::Encoding));
        assert_eq!(RequestId::decode(""), Err(RequestIdError::Malformed));
        assert_eq!(
            RequestId::decode(&URL_SAFE_NO_PAD.encode([0u8, 10, 1])),
            Err(RequestIdError::Malformed)
        );
        assert_eq!(
            RequestId::decode(&URL_SAFE_NO_PAD.encode([9u8, 0, b'x'])),
            Err(RequestIdError::Malformed)
        );
    }
}
