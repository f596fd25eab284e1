//! Command request ids that carry their own routing and say whom they were issued to: any
//! adapter instance can turn a device's response back into an AMQP message for the right
//! application, without shared state, and only the device the command went to (or a
//! gateway acting for it) can answer it.
//!
//! The id is base64url (safe in MQTT topic levels, HTTP headers and CoAP paths) of
//! `tag | correlation-id length (u8) | correlation-id | reply id | MAC`, where the MAC is
//! the first 16 bytes of HMAC-SHA256 under the deployment's [`RequestKey`] over the tenant,
//! the device and everything before it. Every instance of a deployment needs the same key.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fe2o3_amqp::types::messaging::MessageId;
use fe2o3_amqp::types::primitives::{Binary, Uuid};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

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
    /// Well-formed, but not issued to this device of this tenant (or forged).
    #[error("the command with this request id was not sent to this device")]
    NotIssuedTo,
}

/// The deployment's key for request-id MACs.
#[derive(Clone)]
pub struct RequestKey(Hmac<Sha256>);

impl std::fmt::Debug for RequestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestKey(..)")
    }
}

/// Bytes of MAC in a request id (128 bits).
const MAC_LEN: usize = 16;
/// Name of the generated key file in the data directory.
pub const KEY_FILE: &str = "command-request-key";

impl RequestKey {
    /// A key from secret bytes (at least 32).
    ///
    /// # Errors
    /// Fewer than 32 bytes.
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < 32 {
            return Err(format!(
                "a command request-id key needs at least 32 bytes, got {}",
                secret.len()
            ));
        }
        Ok(Self(<Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key")))
    }

    /// A fresh random key (tests; a single process that never restarts).
    pub fn random() -> Self {
        let secret: [u8; 32] = rand::random();
        Self::new(&secret).expect("32 bytes")
    }

    /// The key kept in `dir/command-request-key`, created (64 hex digits, mode 0600) on
    /// first use, so that request ids stay valid across restarts.
    ///
    /// # Errors
    /// The file cannot be read or written, or holds something other than a key.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(KEY_FILE);
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = hex_decode(text.trim())
                    .ok_or_else(|| invalid(format!("{}: not hex", path.display())))?;
                Self::new(&bytes).map_err(invalid)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                file.write_all(hex_encode(&secret).as_bytes())?;
                file.sync_all()?;
                Self::new(&secret).map_err(invalid)
            }
            Err(e) => Err(e),
        }
    }

    fn mac(&self, tenant: &str, device: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        for part in [tenant.as_bytes(), device.as_bytes()] {
            mac.update(&(part.len() as u32).to_be_bytes());
            mac.update(part);
        }
        mac.update(body);
        mac
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// A request id's bytes: the body, then [`MAC_LEN`] bytes of MAC.
struct Sealed(Vec<u8>);

impl Sealed {
    fn body(&self) -> &[u8] {
        &self.0[..self.0.len() - MAC_LEN]
    }

    fn mac(&self) -> &[u8] {
        &self.0[self.0.len() - MAC_LEN..]
    }
}

/// Decodes `text` into body and MAC (not checked yet).
fn unsealed(text: &str) -> Result<Sealed, RequestIdError> {
    let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| RequestIdError::Encoding)?;
    if raw.len() < MAC_LEN {
        return Err(RequestIdError::Malformed);
    }
    Ok(Sealed(raw))
}

const STRING: u8 = 0;
const ULONG: u8 = 1;
const UUID: u8 = 2;
const BINARY: u8 = 3;

impl RequestId {
    /// The id for a command sent to `device` of `tenant`.
    ///
    /// # Errors
    /// The correlation id is longer than 255 bytes.
    pub fn seal(
        &self,
        key: &RequestKey,
        tenant: &str,
        device: &str,
    ) -> Result<String, RequestIdError> {
        let (tag, bytes): (u8, Vec<u8>) = match &self.correlation_id {
            MessageId::String(s) => (STRING, s.as_bytes().to_vec()),
            MessageId::Ulong(n) => (ULONG, n.to_be_bytes().to_vec()),
            MessageId::Uuid(u) => (UUID, u.as_inner().to_vec()),
            MessageId::Binary(b) => (BINARY, b.to_vec()),
        };
        let len = u8::try_from(bytes.len()).map_err(|_| RequestIdError::TooLong)?;
        let mut raw = Vec::with_capacity(2 + bytes.len() + self.reply_id.len() + MAC_LEN);
        raw.push(tag);
        raw.push(len);
        raw.extend_from_slice(&bytes);
        raw.extend_from_slice(self.reply_id.as_bytes());
        let mac = key.mac(tenant, device, &raw).finalize().into_bytes();
        raw.extend_from_slice(&mac[..MAC_LEN]);
        Ok(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Reads an id a device of `tenant` answered with, as `device`: only an id sealed for
    /// that device (under the same key) opens.
    ///
    /// # Errors
    /// Not an id ([`RequestIdError::Encoding`], [`RequestIdError::Malformed`]), or not
    /// issued to this device ([`RequestIdError::NotIssuedTo`]).
    pub fn open(
        key: &RequestKey,
        tenant: &str,
        device: &str,
        text: &str,
    ) -> Result<Self, RequestIdError> {
        let raw = unsealed(text)?;
        let (body, mac) = (raw.body(), raw.mac());
        let id = Self::parse(body)?;
        // The MAC is checked after parsing only so that errors name the problem; the
        // parse result is not used unless the MAC matches.
        key.mac(tenant, device, body)
            .verify_truncated_left(mac)
            .map_err(|_| RequestIdError::NotIssuedTo)?;
        Ok(id)
    }

    /// Whether `text` has the form of a request id (for a protocol-level answer before
    /// anyone checks whom it was issued to).
    ///
    /// # Errors
    /// [`RequestIdError::Encoding`], [`RequestIdError::Malformed`].
    pub fn check_form(text: &str) -> Result<(), RequestIdError> {
        let raw = unsealed(text)?;
        Self::parse(raw.body()).map(drop)
    }

    fn parse(raw: &[u8]) -> Result<Self, RequestIdError> {
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
        let key = RequestKey::random();
        for correlation_id in [
            MessageId::String("abc-123".into()),
            MessageId::Ulong(42),
            MessageId::Uuid(Uuid::from([7u8; 16])),
            MessageId::Binary(Binary::from(vec![0u8, 255, 3])),
        ] {
            let id = RequestId { correlation_id, reply_id: "app-1/x".into() };
            let text = id.seal(&key, "t", "d").unwrap();
            assert!(
                text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{text}"
            );
            assert_eq!(RequestId::open(&key, "t", "d", &text).unwrap(), id);
        }
    }

    #[test]
    fn opens_only_for_the_device_tenant_and_key_it_was_sealed_for() {
        let key = RequestKey::random();
        let id = RequestId { correlation_id: MessageId::Ulong(1), reply_id: "app".into() };
        let text = id.seal(&key, "t", "d").unwrap();
        for (key, tenant, device) in [
            (&key, "t", "other"),
            (&key, "u", "d"),
            (&key, "td", ""),
            (&RequestKey::random(), "t", "d"),
        ] {
            assert_eq!(
                RequestId::open(key, tenant, device, &text),
                Err(RequestIdError::NotIssuedTo),
                "{tenant}/{device}"
            );
        }
        // The old unsealed form, or one with its reply id changed, does not open either.
        let mut raw = URL_SAFE_NO_PAD.decode(&text).unwrap();
        let n = raw.len() - MAC_LEN - 1;
        raw[n] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(RequestId::open(&key, "t", "d", &tampered), Err(RequestIdError::NotIssuedTo));
    }

    #[test]
    fn rejects_garbage() {
        let key = RequestKey::random();
        let open = |text: &str| RequestId::open(&key, "t", "d", text);
        assert_eq!(open("!!"), Err(RequestIdError::Encoding));
        assert_eq!(open(""), Err(RequestIdError::Malformed));
        let mac = [0u8; MAC_LEN];
        for body in [&[0u8, 10, 1][..], &[9u8, 0, b'x'], &[0u8, 0]] {
            let raw = [body, &mac].concat();
            assert_eq!(open(&URL_SAFE_NO_PAD.encode(raw)), Err(RequestIdError::Malformed));
        }
    }

    #[test]
    fn the_key_file_is_created_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ferrule-request-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = RequestKey::load_or_create(&dir).unwrap();
        let mode = std::fs::metadata(dir.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = RequestKey::load_or_create(&dir).unwrap();
        let id = RequestId { correlation_id: MessageId::Ulong(7), reply_id: "r".into() };
        let text = id.seal(&first, "t", "d").unwrap();
        assert_eq!(RequestId::open(&again, "t", "d", &text).unwrap(), id);
        std::fs::write(dir.join(KEY_FILE), "short").unwrap();
        assert!(RequestKey::load_or_create(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
