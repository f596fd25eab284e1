//! The DTLS front: what a datagram on the DTLS port must look like before the cookie
//! check (`dtls.rs`) or OpenSSL sees it. Pure functions over the bytes (fuzzed in
//! `fuzz/`); the socket loop in `connection.rs` applies them and keeps the per-session
//! budget.
//!
//! It admits only what a PSK client sends in a handshake, in the shape it sends it:
//! epoch-0 handshake messages whole (never fragmented: a PSK client's ClientHello and
//! ClientKeyExchange are far below any MTU), only ClientHello and ClientKeyExchange, a
//! ClientHello that parses exactly, small encrypted handshake records (the Finished),
//! and a bounded number of handshake records per session ([`HANDSHAKE_RECORD_BUDGET`]).
//! OpenSSL would cope with more; the point is that nothing a peer sends before it has
//! authenticated costs more than a few small, bounded steps (webrtc-dtls, used before,
//! recursed once per chained fragment and aborted the process on ~2.6 MB of them).

/// Records in one datagram; a flight of a PSK client has at most four.
pub const MAX_RECORDS_PER_DATAGRAM: usize = 8;
/// Largest plaintext handshake message (ClientHello, ClientKeyExchange) accepted.
pub const MAX_HANDSHAKE_MESSAGE: usize = 2048;
/// Largest encrypted handshake record (the client's Finished is about 50 bytes).
pub const MAX_ENCRYPTED_HANDSHAKE_RECORD: usize = 128;
/// Handshake records one session may receive in its whole life, retransmissions
/// included (a PSK handshake needs five; a lossy link repeats flights a few times).
pub const HANDSHAKE_RECORD_BUDGET: u32 = 48;

const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;
const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const CLIENT_HELLO: u8 = 1;
const CLIENT_KEY_EXCHANGE: u8 = 16;

/// What an admitted datagram carries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// An epoch-0 ClientHello (a handshake starts or is retransmitted).
    pub client_hello: bool,
    /// Handshake records (any epoch): charged to the session's budget.
    pub handshake_records: u32,
    /// Only epoch-0 records: part of a handshake, never of an established session.
    pub plaintext_only: bool,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a sequence of well-formed DTLS 1.x records.
    Malformed,
    /// More records than a client flight has.
    TooManyRecords,
    /// A fragmented, oversized or unexpected handshake message, or a bad ClientHello.
    Handshake,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::TooManyRecords => "too_many_records",
            Refusal::Handshake => "bad_handshake",
        }
    }
}

/// Checks a datagram from a DTLS client.
pub fn inspect(datagram: &[u8]) -> Result<Shape, Refusal> {
    let mut shape = Shape { plaintext_only: true, ..Shape::default() };
    let mut rest = datagram;
    let mut records = 0;
    if rest.is_empty() {
        return Err(Refusal::Malformed);
    }
    while !rest.is_empty() {
        records += 1;
        if records > MAX_RECORDS_PER_DATAGRAM {
            return Err(Refusal::TooManyRecords);
        }
        let header = rest.get(..RECORD_HEADER).ok_or(Refusal::Malformed)?;
        let (content, major) = (header[0], header[1]);
        let epoch = u16::from_be_bytes([header[3], header[4]]);
        let length = u16::from_be_bytes([header[11], header[12]]) as usize;
        let body = rest.get(RECORD_HEADER..RECORD_HEADER + length).ok_or(Refusal::Malformed)?;
        rest = &rest[RECORD_HEADER + length..];
        if major != 0xfe {
            return Err(Refusal::Malformed);
        }
        if epoch != 0 {
            shape.plaintext_only = false;
        }
        match (content, epoch) {
            (CONTENT_HANDSHAKE, 0) => {
                shape.handshake_records += 1;
                shape.client_hello |= plaintext_handshake(body)?;
            }
            (CONTENT_HANDSHAKE, _) => {
                if body.len() > MAX_ENCRYPTED_HANDSHAKE_RECORD {
                    return Err(Refusal::Handshake);
                }
                shape.handshake_records += 1;
            }
            (CONTENT_CHANGE_CIPHER_SPEC | CONTENT_ALERT, _) => {}
            (CONTENT_APPLICATION_DATA, epoch) if epoch != 0 => {}
            _ => return Err(Refusal::Malformed),
        }
    }
    Ok(shape)
}

/// The PSK identity of a ClientKeyExchange in a datagram already admitted by [`inspect`]
/// (epoch-0 handshake records only), if it carries one.
pub fn psk_identity(datagram: &[u8]) -> Option<&[u8]> {
    let mut rest = datagram;
    while rest.len() >= RECORD_HEADER {
        let length = u16::from_be_bytes([rest[11], rest[12]]) as usize;
        let body = rest.get(RECORD_HEADER..RECORD_HEADER + length)?;
        if rest[0] == CONTENT_HANDSHAKE && rest[3..5] == [0, 0] {
            let mut messages = body;
            while messages.len() >= HANDSHAKE_HEADER {
                let length =
                    u32::from_be_bytes([0, messages[1], messages[2], messages[3]]) as usize;
                let message = messages.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + length)?;
                if messages[0] == CLIENT_KEY_EXCHANGE {
                    return message.get(2..);
                }
                messages = &messages[HANDSHAKE_HEADER + length..];
            }
        }
        rest = &rest[RECORD_HEADER + length..];
    }
    None
}

/// Checks the handshake messages of one epoch-0 record; true if one is a ClientHello.
fn plaintext_handshake(mut body: &[u8]) -> Result<bool, Refusal> {
    let mut client_hello = false;
    if body.is_empty() {
        return Err(Refusal::Handshake);
    }
    while !body.is_empty() {
        let header = body.get(..HANDSHAKE_HEADER).ok_or(Refusal::Handshake)?;
        let u24 = |at: usize| {
            u32::from_be_bytes([0, header[at], header[at + 1], header[at + 2]]) as usize
        };
        let (kind, length, offset, fragment) = (header[0], u24(1), u24(6), u24(9));
        // Whole messages only: no reassembly is ever needed for a PSK client.
        if offset != 0 || fragment != length || length > MAX_HANDSHAKE_MESSAGE {
            return Err(Refusal::Handshake);
        }
        let message =
            body.get(HANDSHAKE_HEADER..HANDSHAKE_HEADER + length).ok_or(Refusal::Handshake)?;
        body = &body[HANDSHAKE_HEADER + length..];
        match kind {
            CLIENT_HELLO => {
                client_hello_is_well_formed(message).then_some(()).ok_or(Refusal::Handshake)?;
                client_hello = true;
            }
            CLIENT_KEY_EXCHANGE => {
                // psk_identity<0..2^16-1>, exactly.
                let [hi, lo, identity @ ..] = message else { return Err(Refusal::Handshake) };
                if identity.len() != u16::from_be_bytes([*hi, *lo]) as usize {
                    return Err(Refusal::Handshake);
                }
            }
            _ => return Err(Refusal::Handshake),
        }
    }
    Ok(client_hello)
}

/// A ClientHello (RFC 6347 §4.2.1) that parses exactly, with an empty session id (all a
/// new PSK session sends: resumption is not offered), at least
/// one cipher suite and compression method, and extensions that tile their block.
pub fn client_hello_is_well_formed(message: &[u8]) -> bool {
    let mut r = Cursor(message);
    let fixed = r.take(2 + 32).is_some(); // client_version, random
    let session_id_empty = r.u8() == Some(0);
    let cookie = r.u8().and_then(|n| r.take(n as usize)).is_some();
    let suites =
        r.u16().filter(|n| *n >= 2 && n % 2 == 0).and_then(|n| r.take(n as usize)).is_some();
    let compression = r.u8().filter(|n| *n >= 1).and_then(|n| r.take(n as usize)).is_some();
    if !(fixed && session_id_empty && cookie && suites && compression) {
        return false;
    }
    if r.0.is_empty() {
        return true;
    }
    let Some(block) = r.u16().and_then(|n| r.take(n as usize)) else { return false };
    if !r.0.is_empty() {
        return false;
    }
    let mut extensions = Cursor(block);
    while !extensions.0.is_empty() {
        let ok = extensions.take(2).is_some()
            && extensions.u16().and_then(|n| extensions.take(n as usize)).is_some();
        if !ok {
            return false;
        }
    }
    true
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content: u8, epoch: u16, body: &[u8]) -> Vec<u8> {
        let mut out = vec![content, 0xfe, 0xfd];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn handshake(kind: u8, seq: u16, message: &[u8], offset: usize, fragment: &[u8]) -> Vec<u8> {
        let u24 = |n: usize| (n as u32).to_be_bytes()[1..].to_vec();
        let mut out = vec![kind];
        out.extend(u24(message.len()));
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend(u24(offset));
        out.extend(u24(fragment.len()));
        out.extend_from_slice(fragment);
        out
    }

    pub(crate) fn client_hello_body(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut out = vec![0xfe, 0xfd];
        out.extend_from_slice(&[7; 32]);
        out.push(0); // session id
        out.push(0); // cookie
        out.extend_from_slice(&[0, 2, 0xc0, 0xa8]); // TLS_PSK_WITH_AES_128_CCM_8
        out.extend_from_slice(&[1, 0]);
        if let Some(extensions) = extensions {
            out.extend_from_slice(extensions);
        }
        out
    }

    #[test]
    fn a_psk_handshake_passes() {
        let hello = client_hello_body(Some(&[0, 8, 0, 0x17, 0, 0, 0, 0x0a, 0, 0]));
        let datagram = record(22, 0, &handshake(1, 0, &hello, 0, &hello));
        assert_eq!(
            inspect(&datagram),
            Ok(Shape { client_hello: true, handshake_records: 1, plaintext_only: true })
        );
        // Flight 5: ClientKeyExchange, ChangeCipherSpec, encrypted Finished.
        let cke = [0, 6, b'd', b'1', b'@', b't', b'1', b'x'];
        let mut flight = record(22, 0, &handshake(16, 2, &cke[..8], 0, &cke[..8]));
        flight.extend(record(20, 0, &[1]));
        flight.extend(record(22, 1, &[0xaa; 48]));
        let shape = inspect(&flight).expect("admitted");
        assert_eq!(psk_identity(&flight), Some(&b"d1@t1x"[..]));
        assert_eq!(psk_identity(&record(23, 1, &[1, 2, 3])), None);
        assert_eq!(
            (shape.client_hello, shape.handshake_records, shape.plaintext_only),
            (false, 2, false)
        );
        // Application data after the handshake.
        assert!(inspect(&record(23, 1, &[1, 2, 3])).is_ok());
    }

    #[test]
    fn fragments_and_oddities_are_refused() {
        let hello = client_hello_body(None);
        // The C1 attack: one-byte fragments of one message.
        let fragment = record(22, 0, &handshake(1, 0, &hello, 5, &hello[5..6]));
        assert_eq!(inspect(&fragment), Err(Refusal::Handshake));
        // Other messages than a PSK client's; oversize messages; big encrypted records.
        assert_eq!(
            inspect(&record(22, 0, &handshake(11, 1, &[0; 3], 0, &[0; 3]))),
            Err(Refusal::Handshake)
        );
        let big = vec![0; MAX_HANDSHAKE_MESSAGE + 1];
        assert_eq!(
            inspect(&record(22, 0, &handshake(16, 1, &big, 0, &big))),
            Err(Refusal::Handshake)
        );
        assert_eq!(inspect(&record(22, 1, &[0; 200])), Err(Refusal::Handshake));
        // Truncated records, unknown content types, plaintext application data.
        let mut truncated = record(22, 0, &handshake(1, 0, &hello, 0, &hello));
        truncated.pop();
        assert_eq!(inspect(&truncated), Err(Refusal::Malformed));
        assert_eq!(inspect(&record(24, 1, &[0])), Err(Refusal::Malformed));
        assert_eq!(inspect(&record(23, 0, &[0])), Err(Refusal::Malformed));
        assert_eq!(inspect(&[]), Err(Refusal::Malformed));
        let many: Vec<u8> = (0..9).flat_map(|_| record(21, 1, &[0; 2])).collect();
        assert_eq!(inspect(&many), Err(Refusal::TooManyRecords));
    }

    #[test]
    fn client_hello_must_parse_exactly() {
        assert!(client_hello_is_well_formed(&client_hello_body(None)));
        assert!(client_hello_is_well_formed(&client_hello_body(Some(&[0, 0]))));
        // An extensions block of 1, 2 or 3 bytes (webrtc-dtls, used before, panicked on it).
        for block in [&[0, 1, 0][..], &[0, 2, 0, 0], &[0, 3, 0, 0, 0]] {
            assert!(!client_hello_is_well_formed(&client_hello_body(Some(block))));
        }
        // An extension running past its block, trailing bytes, a non-empty session id.
        assert!(!client_hello_is_well_formed(&client_hello_body(Some(&[0, 4, 0, 1, 0, 9]))));
        assert!(!client_hello_is_well_formed(&client_hello_body(Some(&[0, 0, 1]))));
        let mut with_session = client_hello_body(None);
        with_session[34] = 1;
        with_session.insert(35, 9);
        assert!(!client_hello_is_well_formed(&with_session));
        assert!(!client_hello_is_well_formed(&[0xfe, 0xfd]));
    }
}
