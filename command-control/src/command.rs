//! A command as devices see it, and how an application's AMQP message becomes one.

use bytes::Bytes;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use ferrule_messaging::Message;

use crate::request_id::{RequestId, RequestKey};

/// Application property asking that a command for an offline device be kept (seconds)
/// and delivered when the device next subscribes or polls.
pub const DEFER_TTL_PROPERTY: &str = "x-ferrule-defer-ttl";

/// A command on its way to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub tenant: String,
    /// The device the command is for (a gateway may deliver it).
    pub device_id: String,
    /// The command name (AMQP `subject`).
    pub name: String,
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// `None` for one-way commands; otherwise the id the device answers with.
    pub request_id: Option<String>,
}

/// Why an application's command message is malformed (it is `rejected`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("`to` must be command/{tenant}/DEVICE-ID")]
    BadTo { tenant: String },
    #[error("a command needs a `subject` (the command name)")]
    NoSubject,
    #[error("`reply-to` must be command_response/{tenant}/REPLY-ID")]
    BadReplyTo { tenant: String },
    #[error("a request/response command needs a `message-id` or `correlation-id`")]
    NoCorrelation,
    #[error("{DEFER_TTL_PROPERTY} must be a positive number of seconds")]
    BadDeferTtl,
    #[error("the command body must be one data section, a string or empty")]
    BadBody,
    #[error("{0}")]
    RequestId(#[from] crate::request_id::RequestIdError),
}

/// A parsed command plus what only the router needs.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub command: Command,
    /// Seconds to keep the command for an offline device.
    pub defer_ttl: Option<u64>,
}

/// Validates and parses a message sent to `command/TENANT` (Hono's command format); a
/// request/response command's request id is sealed with `key` for its device.
pub fn parse(tenant: &str, message: &Message, key: &RequestKey) -> Result<Parsed, CommandError> {
    let props = message.properties.as_ref();
    let to = props.and_then(|p| p.to.as_deref()).unwrap_or_default();
    let device_id = to
        .strip_prefix("command/")
        .and_then(|rest| rest.split_once('/'))
        .filter(|(t, d)| *t == tenant && !d.is_empty() && !d.contains('/'))
        .map(|(_, d)| d.to_owned())
        .ok_or_else(|| CommandError::BadTo { tenant: tenant.to_owned() })?;
    let name = props
        .and_then(|p| p.subject.clone())
        .filter(|s| !s.is_empty())
        .ok_or(CommandError::NoSubject)?;
    let request_id = match props.and_then(|p| p.reply_to.as_deref()) {
        None => None,
        Some(reply_to) => {
            let prefix = format!("command_response/{tenant}/");
            let reply_id = reply_to
                .strip_prefix(&prefix)
                .filter(|r| !r.is_empty())
                .ok_or_else(|| CommandError::BadReplyTo { tenant: tenant.to_owned() })?;
            let correlation_id = props
                .and_then(|p| p.correlation_id.clone().or_else(|| p.message_id.clone()))
                .ok_or(CommandError::NoCorrelation)?;
            let id = RequestId { correlation_id, reply_id: reply_id.to_owned() };
            Some(id.seal(key, tenant, &device_id)?)
        }
    };
    let payload = match &message.body {
        Body::Data(batch) => {
            let mut bytes = Vec::new();
            for data in batch.iter() {
                bytes.extend_from_slice(&data.0);
            }
            Bytes::from(bytes)
        }
        Body::Empty => Bytes::new(),
        Body::Value(v) => match &v.0 {
            Value::String(s) => Bytes::from(s.clone().into_bytes()),
            Value::Binary(b) => Bytes::from(b.to_vec()),
            Value::Null => Bytes::new(),
            _ => return Err(CommandError::BadBody),
        },
        Body::Sequence(_) => return Err(CommandError::BadBody),
    };
    let defer_ttl =
        match message.application_properties.as_ref().and_then(|a| a.0.get(DEFER_TTL_PROPERTY)) {
            None => None,
            Some(value) => Some(positive(value).ok_or(CommandError::BadDeferTtl)?),
        };
    let content_type = props.and_then(|p| p.content_type.as_ref()).map(|s| s.as_str().to_owned());
    Ok(Parsed {
        command: Command {
            tenant: tenant.to_owned(),
            device_id,
            name,
            payload,
            content_type,
            request_id,
        },
        defer_ttl,
    })
}

fn positive(value: &SimpleValue) -> Option<u64> {
    let n: i128 = match value {
        SimpleValue::Int(n) => *n as i128,
        SimpleValue::Long(n) => *n as i128,
        SimpleValue::Uint(n) => *n as i128,
        SimpleValue::Ulong(n) => *n as i128,
        SimpleValue::Short(n) => *n as i128,
        SimpleValue::Ushort(n) => *n as i128,
        SimpleValue::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (n > 0).then(|| n.min(u64::MAX as i128) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{ApplicationProperties, MessageId, Properties};
    use fe2o3_amqp::types::primitives::OrderedMap;
    use ferrule_messaging::message::data_message;

    fn command(
        to: &str,
        subject: Option<&str>,
        reply_to: Option<&str>,
        id: Option<&str>,
    ) -> Message {
        let mut m = data_message(b"on".to_vec());
        m.properties = Some(Properties {
            to: Some(to.into()),
            subject: subject.map(Into::into),
            reply_to: reply_to.map(Into::into),
            message_id: id.map(|i| MessageId::String(i.into())),
            content_type: Some("text/plain".into()),
            ..Default::default()
        });
        m
    }

    #[test]
    fn request_response_and_one_way() {
        let key = RequestKey::random();
        let p = parse(
            "t1",
            &command("command/t1/d1", Some("light"), Some("command_response/t1/app1"), Some("m1")),
            &key,
        )
        .unwrap();
        assert_eq!(p.command.device_id, "d1");
        assert_eq!(p.command.name, "light");
        assert_eq!(&p.command.payload[..], b"on");
        let id = RequestId::open(&key, "t1", "d1", p.command.request_id.as_deref().unwrap());
        assert_eq!(
            id.unwrap(),
            RequestId { correlation_id: MessageId::String("m1".into()), reply_id: "app1".into() }
        );
        let one_way =
            parse("t1", &command("command/t1/d1", Some("light"), None, None), &key).unwrap();
        assert_eq!(one_way.command.request_id, None);
    }

    #[test]
    fn malformed_commands() {
        let cases = [
            (command("command/t2/d1", Some("x"), None, None), "foreign tenant"),
            (command("command/t1", Some("x"), None, None), "no device"),
            (command("command/t1/d1/x", Some("x"), None, None), "extra segment"),
            (command("command/t1/d1", None, None, None), "no subject"),
            (
                command("command/t1/d1", Some("x"), Some("elsewhere/t1/a"), Some("m")),
                "bad reply-to",
            ),
            (
                command("command/t1/d1", Some("x"), Some("command_response/t1/a"), None),
                "no correlation",
            ),
        ];
        for (message, what) in cases {
            assert!(parse("t1", &message, &RequestKey::random()).is_err(), "{what}");
        }
    }

    #[test]
    fn defer_ttl() {
        let mut m = command("command/t1/d1", Some("x"), None, None);
        let mut props = OrderedMap::new();
        props.insert(DEFER_TTL_PROPERTY.to_owned(), SimpleValue::Int(30));
        m.application_properties = Some(ApplicationProperties(props.clone()));
        let key = RequestKey::random();
        assert_eq!(parse("t1", &m, &key).unwrap().defer_ttl, Some(30));
        props.insert(DEFER_TTL_PROPERTY.to_owned(), SimpleValue::Int(-1));
        m.application_properties = Some(ApplicationProperties(props));
        assert_eq!(parse("t1", &m, &key).unwrap_err(), CommandError::BadDeferTtl);
    }
}
