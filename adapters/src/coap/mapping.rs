//! CoAP request → upload: pure translation of method, Uri-Path, Uri-Query and
//! Content-Format into endpoint, target device and message options (no I/O).
//!
//! Size: 350 lines of code; the rest are tests, one per Hono URI and option rule.

use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};

use crate::downstream::{Endpoint, Qos, EMPTY_NOTIFICATION};

/// What a request asks for, before authentication decides who may do it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub endpoint: Endpoint,
    /// `Some((tenant, device))` for `PUT /ENDPOINT/TENANT/DEVICE` (gateways and
    /// unauthenticated devices). An empty tenant means "the gateway's own tenant".
    pub target: Option<(String, String)>,
}

/// Everything the adapter needs from one request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub route: Route,
    pub qos: Qos,
    pub content_type: Option<String>,
    /// `hono-ttl` (events only).
    pub ttl: Option<Duration>,
    /// The URI path as the device sent it: `orig_address`.
    pub path: String,
    /// `hono-ttd`: how long the device waits for a command in the response (uncapped).
    pub ttd: Option<Duration>,
    /// The device used the short endpoint names (`t`, `e`): commands name their
    /// response resource in the short form (`cr`, `c`) too.
    pub short_form: bool,
}

/// `POST /command_response/REQ-ID` (`/cr/...`) or `PUT /command_response/TENANT/DEVICE/REQ-ID`:
/// a device's (or a gateway's) answer to a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResponse {
    pub request_id: String,
    /// `Some((tenant, device))` for the PUT form; an empty tenant means the gateway's own.
    pub target: Option<(String, String)>,
    /// `hono-cmd-status`, 200 to 599.
    pub status: u16,
    pub content_type: Option<String>,
    pub path: String,
}

/// Why a request cannot be mapped. Each maps to one CoAP code in `mod.rs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// No such resource (4.04).
    #[error("no such resource: {0}")]
    NotFound(String),
    /// Known resource, wrong method (4.05).
    #[error("method not allowed on {0}")]
    MethodNotAllowed(String),
    /// An option or query parameter is malformed (4.00).
    #[error("{0}")]
    BadOption(String),
    /// Events need a confirmable request (4.00).
    #[error("events must be sent as confirmable (CON) requests")]
    EventNotConfirmable,
    /// A critical option this adapter does not understand (4.02, RFC 7252 §5.4.1).
    #[error("unsupported critical option {0}")]
    UnsupportedCriticalOption(u16),
    /// A Content-Format number this adapter has no media type for (4.15).
    #[error("unsupported content format {0}")]
    UnsupportedContentFormat(u16),
}

/// Decodes a request packet (already known to be a CON or NON request).
pub fn request(packet: &Packet) -> Result<Request, MappingError> {
    if let Some(option) = unsupported_critical_option(packet) {
        return Err(MappingError::UnsupportedCriticalOption(option));
    }
    let segments = uri_path(packet)?;
    let path = format!("/{}", segments.join("/"));
    let method = match packet.header.code {
        MessageClass::Request(method) => method,
        _ => return Err(MappingError::MethodNotAllowed(path)),
    };
    let route = route(method, &segments, &path)?;
    let qos = match packet.header.get_type() {
        MessageType::NonConfirmable if route.endpoint == Endpoint::Event => {
            return Err(MappingError::EventNotConfirmable)
        }
        MessageType::NonConfirmable => Qos::AtMostOnce,
        _ => Qos::AtLeastOnce,
    };
    let query = Query::parse(packet)?;
    let content_type = if query.empty {
        if !packet.payload.is_empty() {
            return Err(MappingError::BadOption(
                "an empty notification must not have a payload".into(),
            ));
        }
        Some(EMPTY_NOTIFICATION.to_owned())
    } else {
        content_format(packet)?.map(str::to_owned)
    };
    let ttl = if route.endpoint == Endpoint::Event { query.ttl } else { None };
    let short_form = matches!(segments.first().map(String::as_str), Some("t" | "e"));
    Ok(Request { route, qos, content_type, ttl, path, ttd: query.ttd, short_form })
}

/// Decodes a request to `command_response` (`cr`); `Ok(None)` for any other resource.
pub fn command_response(packet: &Packet) -> Result<Option<CommandResponse>, MappingError> {
    let segments = uri_path(packet)?;
    if !matches!(segments.first().map(String::as_str), Some("command_response" | "cr")) {
        return Ok(None);
    }
    if let Some(option) = unsupported_critical_option(packet) {
        return Err(MappingError::UnsupportedCriticalOption(option));
    }
    let path = format!("/{}", segments.join("/"));
    let method = match packet.header.code {
        MessageClass::Request(method) => method,
        _ => return Err(MappingError::MethodNotAllowed(path)),
    };
    let (request_id, target) = match (method, &segments[1..]) {
        (RequestType::Post, [id]) if !id.is_empty() => (id.clone(), None),
        (RequestType::Put, [tenant, device, id]) if !device.is_empty() && !id.is_empty() => {
            (id.clone(), Some((tenant.clone(), device.clone())))
        }
        (_, [id]) if !id.is_empty() => return Err(MappingError::MethodNotAllowed(path)),
        (_, [_, device, id]) if !device.is_empty() && !id.is_empty() => {
            return Err(MappingError::MethodNotAllowed(path))
        }
        _ => return Err(MappingError::NotFound(path)),
    };
    let status = Query::parse(packet)?
        .status
        .ok_or_else(|| MappingError::BadOption("hono-cmd-status (200-599) is required".into()))?;
    let content_type = content_format(packet)?.map(str::to_owned);
    Ok(Some(CommandResponse { request_id, target, status, content_type, path }))
}

/// Maps `POST /telemetry|t|event|e` and `PUT /telemetry|t|event|e/TENANT/DEVICE`.
pub fn route(method: RequestType, segments: &[String], path: &str) -> Result<Route, MappingError> {
    let endpoint = match segments.first().map(String::as_str) {
        Some("telemetry" | "t") => Endpoint::Telemetry,
        Some("event" | "e") => Endpoint::Event,
        _ => return Err(MappingError::NotFound(path.to_owned())),
    };
    match (method, &segments[1..]) {
        (RequestType::Post, []) => Ok(Route { endpoint, target: None }),
        (RequestType::Put, [tenant, device]) if !device.is_empty() => {
            Ok(Route { endpoint, target: Some((tenant.clone(), device.clone())) })
        }
        // `PUT /t/TENANT/` (no device) is not a resource, as in Hono 2.0.2+.
        (RequestType::Put, [_, _]) => Err(MappingError::NotFound(path.to_owned())),
        (_, []) | (_, [_, _]) => Err(MappingError::MethodNotAllowed(path.to_owned())),
        _ => Err(MappingError::NotFound(path.to_owned())),
    }
}

/// Critical options (odd numbers) other than the ones a request to this adapter may
/// carry. Block1 is reassembled before mapping (see `session::Assemblies`); Block2 in a
/// request only states a preferred response block size, and responses are small.
fn unsupported_critical_option(packet: &Packet) -> Option<u16> {
    const UNDERSTOOD: [u16; 7] = [
        3,  // Uri-Host
        7,  // Uri-Port
        11, // Uri-Path
        15, // Uri-Query
        17, // Accept
        23, // Block2
        27, // Block1
    ];
    packet.options().map(|(number, _)| *number).find(|n| n % 2 == 1 && !UNDERSTOOD.contains(n))
}

/// A Block1 option (RFC 7959 §2.2): block number, more flag, size exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub num: u32,
    pub more: bool,
    /// Block size is `2^(szx + 4)`, 16 to 1024 bytes.
    pub szx: u8,
}

impl Block {
    pub fn size(self) -> usize {
        16 << self.szx
    }

    /// The option value: NUM | M | SZX in as few bytes as carry it (a uint option).
    pub fn encode(self) -> Vec<u8> {
        let value = (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx);
        let bytes = value.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        bytes[skip..].to_vec()
    }
}

/// The request's Block1 option, if any. SZX 7 is reserved (RFC 7959 §2.2): 4.00.
pub fn block1(packet: &Packet) -> Result<Option<Block>, MappingError> {
    let Some(value) = packet.get_first_option(CoapOption::Block1) else { return Ok(None) };
    if value.len() > 3 {
        return Err(MappingError::BadOption("Block1 longer than three bytes".into()));
    }
    let value = value.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b));
    let szx = (value & 0b111) as u8;
    if szx == 7 {
        return Err(MappingError::BadOption("Block1 with the reserved size exponent 7".into()));
    }
    Ok(Some(Block { num: value >> 4, more: value & 0b1000 != 0, szx }))
}

/// The request's Size1 option (RFC 7959 §4): the whole body's announced size.
pub fn size1(packet: &Packet) -> Option<usize> {
    let value = packet.get_first_option(CoapOption::Size1)?;
    (value.len() <= 4).then(|| value.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)))
}

/// What tells one block-wise transfer from another of the same peer: method, Uri-Path,
/// Uri-Query and Request-Tag (RFC 9175 §3), all of which every block repeats.
pub fn transfer_key(packet: &Packet) -> Vec<u8> {
    const REQUEST_TAG: u16 = 292;
    let mut key = vec![u8::from(packet.header.code)];
    for number in [u16::from(CoapOption::UriPath), u16::from(CoapOption::UriQuery), REQUEST_TAG] {
        for value in packet.get_option(CoapOption::from(number)).into_iter().flatten() {
            key.extend_from_slice(&(value.len() as u16).to_be_bytes());
            key.extend_from_slice(value);
        }
        key.push(0xff);
    }
    key
}

/// The Uri-Path options, one per segment (CoAP carries them decoded already).
fn uri_path(packet: &Packet) -> Result<Vec<String>, MappingError> {
    let Some(options) = packet.get_option(CoapOption::UriPath) else { return Ok(Vec::new()) };
    options
        .iter()
        .map(|segment| {
            String::from_utf8(segment.clone())
                .map_err(|_| MappingError::BadOption("Uri-Path is not UTF-8".into()))
        })
        .collect()
}

/// The Uri-Query parameters Hono's CoAP adapter knows.
#[derive(Debug, Default, PartialEq, Eq)]
struct Query {
    ttl: Option<Duration>,
    empty: bool,
    ttd: Option<Duration>,
    status: Option<u16>,
}

impl Query {
    fn parse(packet: &Packet) -> Result<Query, MappingError> {
        let mut query = Query::default();
        let Some(options) = packet.get_option(CoapOption::UriQuery) else { return Ok(query) };
        for option in options {
            let text = std::str::from_utf8(option)
                .map_err(|_| MappingError::BadOption("Uri-Query is not UTF-8".into()))?;
            let (key, value) = text.split_once('=').unwrap_or((text, ""));
            match key {
                "hono-ttl" => {
                    let seconds = value.parse::<u64>().map_err(|_| {
                        MappingError::BadOption(format!(
                            "hono-ttl must be a number of seconds, not {value:?}"
                        ))
                    })?;
                    query.ttl = Some(Duration::from_secs(seconds));
                }
                // Hono marks empty notifications with a bare `empty` parameter.
                "empty" => query.empty = value.is_empty() || value == "true",
                // Zero or negative: no wait (as Hono).
                "hono-ttd" => {
                    let seconds = value.parse::<i64>().map_err(|_| {
                        MappingError::BadOption(format!(
                            "hono-ttd must be a number of seconds, not {value:?}"
                        ))
                    })?;
                    query.ttd = (seconds > 0).then(|| Duration::from_secs(seconds as u64));
                }
                "hono-cmd-status" => {
                    let status = value.parse::<u16>().ok().filter(|s| (200..600).contains(s));
                    query.status = Some(status.ok_or_else(|| {
                        MappingError::BadOption(format!(
                            "hono-cmd-status must be 200-599, not {value:?}"
                        ))
                    })?);
                }
                // Unknown parameters are ignored, as Hono does.
                _ => {}
            }
        }
        Ok(query)
    }
}

/// The Content-Format option as a media type. `Ok(None)` when absent.
pub fn content_format(packet: &Packet) -> Result<Option<&'static str>, MappingError> {
    let Some(value) = packet.get_first_option(CoapOption::ContentFormat) else { return Ok(None) };
    // A uint option of at most two bytes, big endian, leading zeros stripped (RFC 7252 §3.2).
    if value.len() > 2 {
        return Err(MappingError::BadOption("Content-Format longer than two bytes".into()));
    }
    let number = value.iter().fold(0u16, |n, b| (n << 8) | u16::from(*b));
    media_type(number).map(Some).ok_or(MappingError::UnsupportedContentFormat(number))
}

/// The media types of the CoAP Content-Formats registry (IANA) that devices use.
pub fn media_type(content_format: u16) -> Option<&'static str> {
    Some(match content_format {
        0 => "text/plain;charset=utf-8",
        16 => "application/cose;cose-type=\"cose-encrypt0\"",
        17 => "application/cose;cose-type=\"cose-mac0\"",
        18 => "application/cose;cose-type=\"cose-sign1\"",
        40 => "application/link-format",
        41 => "application/xml",
        42 => "application/octet-stream",
        47 => "application/exi",
        50 => "application/json",
        51 => "application/json-patch+json",
        52 => "application/merge-patch+json",
        60 => "application/cbor",
        61 => "application/cwt",
        110 => "application/senml+json",
        111 => "application/sensml+json",
        112 => "application/senml+cbor",
        113 => "application/sensml+cbor",
        11542 => "application/vnd.oma.lwm2m+tlv",
        11543 => "application/vnd.oma.lwm2m+json",
        _ => return None,
    })
}

/// The Content-Format number of a media type, if the registry has one (parameters
/// and case ignored, except that `text/plain` means 0).
pub fn content_format_of(content_type: &str) -> Option<u16> {
    let wanted: String = content_type
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    if wanted == "text/plain" || wanted.starts_with("text/plain;") {
        return Some(0);
    }
    const KNOWN: [u16; 19] =
        [0, 16, 17, 18, 40, 41, 42, 47, 50, 51, 52, 60, 61, 110, 111, 112, 113, 11542, 11543];
    KNOWN.into_iter().find(|n| media_type(*n).is_some_and(|m| m.eq_ignore_ascii_case(&wanted)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(
        kind: MessageType,
        method: RequestType,
        path: &[&str],
        query: &[&str],
        format: Option<&[u8]>,
    ) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(kind);
        p.header.code = MessageClass::Request(method);
        for segment in path {
            p.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
        }
        for q in query {
            p.add_option(CoapOption::UriQuery, q.as_bytes().to_vec());
        }
        if let Some(f) = format {
            p.add_option(CoapOption::ContentFormat, f.to_vec());
        }
        p.payload = b"1".to_vec();
        p
    }

    fn seg(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn routes() {
        let post = RequestType::Post;
        assert_eq!(
            route(post, &seg(&["telemetry"]), "/telemetry"),
            Ok(Route { endpoint: Endpoint::Telemetry, target: None })
        );
        assert_eq!(route(post, &seg(&["t"]), "/t").unwrap().endpoint, Endpoint::Telemetry);
        assert_eq!(route(post, &seg(&["e"]), "/e").unwrap().endpoint, Endpoint::Event);
        assert_eq!(
            route(RequestType::Put, &seg(&["event", "t1", "d 1"]), "").unwrap(),
            Route { endpoint: Endpoint::Event, target: Some(("t1".into(), "d 1".into())) }
        );
        assert_eq!(
            route(RequestType::Put, &seg(&["t", "", "d1"]), "").unwrap().target,
            Some((String::new(), "d1".into()))
        );
        assert!(matches!(
            route(post, &seg(&["nothing"]), "/nothing"),
            Err(MappingError::NotFound(_))
        ));
        assert!(matches!(route(post, &seg(&[]), "/"), Err(MappingError::NotFound(_))));
        assert!(matches!(
            route(RequestType::Get, &seg(&["t"]), "/t"),
            Err(MappingError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            route(RequestType::Put, &seg(&["t"]), "/t"),
            Err(MappingError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            route(post, &seg(&["t", "a", "b"]), ""),
            Err(MappingError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            route(RequestType::Put, &seg(&["t", "a", ""]), ""),
            Err(MappingError::NotFound(_))
        ));
        assert!(matches!(
            route(RequestType::Put, &seg(&["t", "a"]), ""),
            Err(MappingError::NotFound(_))
        ));
        assert!(matches!(
            route(RequestType::Put, &seg(&["t", "a", "b", "c"]), ""),
            Err(MappingError::NotFound(_))
        ));
    }

    #[test]
    fn qos_follows_the_message_type_and_events_need_con() {
        let con = packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], None);
        assert_eq!(request(&con).unwrap().qos, Qos::AtLeastOnce);
        let non = packet(MessageType::NonConfirmable, RequestType::Post, &["t"], &[], None);
        assert_eq!(request(&non).unwrap().qos, Qos::AtMostOnce);
        let non_event =
            packet(MessageType::NonConfirmable, RequestType::Post, &["event"], &[], None);
        assert_eq!(request(&non_event), Err(MappingError::EventNotConfirmable));
        assert_eq!(request(&con).unwrap().path, "/t");
    }

    #[test]
    fn content_formats() {
        // Content-Format 50 = one byte 0x32; 0 = zero-length uint (RFC 7252 §3.2).
        let json = packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], Some(&[0x32]));
        assert_eq!(request(&json).unwrap().content_type.as_deref(), Some("application/json"));
        let text = packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], Some(&[]));
        assert_eq!(
            request(&text).unwrap().content_type.as_deref(),
            Some("text/plain;charset=utf-8")
        );
        // 11542 = 0x2D 0x16.
        let tlv =
            packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], Some(&[0x2d, 0x16]));
        assert_eq!(
            request(&tlv).unwrap().content_type.as_deref(),
            Some("application/vnd.oma.lwm2m+tlv")
        );
        let unknown =
            packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], Some(&[0x03]));
        assert_eq!(request(&unknown), Err(MappingError::UnsupportedContentFormat(3)));
        let long =
            packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], Some(&[0, 0, 50]));
        assert!(matches!(request(&long), Err(MappingError::BadOption(_))));
        let none = packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], None);
        assert_eq!(request(&none).unwrap().content_type, None);
    }

    #[test]
    fn query_parameters() {
        let event = packet(
            MessageType::Confirmable,
            RequestType::Post,
            &["e"],
            &["hono-ttl=30", "foo=bar"],
            None,
        );
        assert_eq!(request(&event).unwrap().ttl, Some(Duration::from_secs(30)));
        let telemetry =
            packet(MessageType::Confirmable, RequestType::Post, &["t"], &["hono-ttl=30"], None);
        assert_eq!(request(&telemetry).unwrap().ttl, None, "ttl is for events");
        let bad =
            packet(MessageType::Confirmable, RequestType::Post, &["e"], &["hono-ttl=soon"], None);
        assert!(matches!(request(&bad), Err(MappingError::BadOption(_))));
        let mut empty =
            packet(MessageType::Confirmable, RequestType::Post, &["e"], &["empty"], None);
        empty.payload.clear();
        assert_eq!(request(&empty).unwrap().content_type.as_deref(), Some(EMPTY_NOTIFICATION));
        let not_empty =
            packet(MessageType::Confirmable, RequestType::Post, &["e"], &["empty"], None);
        assert!(matches!(request(&not_empty), Err(MappingError::BadOption(_))));
        let mut bad_path = packet(MessageType::Confirmable, RequestType::Post, &[], &[], None);
        bad_path.add_option(CoapOption::UriPath, vec![0xff]);
        assert!(matches!(request(&bad_path), Err(MappingError::BadOption(_))));
    }

    #[test]
    fn unknown_critical_options_are_refused() {
        let mut p = packet(MessageType::Confirmable, RequestType::Post, &["t"], &[], None);
        p.add_option(CoapOption::Observe, vec![0]); // 6: elective, ignored
        p.add_option(CoapOption::UriHost, b"example".to_vec());
        p.add_option(CoapOption::Block1, vec![0x0e]); // 27: critical, understood
        assert!(request(&p).is_ok());
        p.add_option(CoapOption::IfMatch, vec![1]); // 1: critical
        assert_eq!(request(&p), Err(MappingError::UnsupportedCriticalOption(1)));
    }

    #[test]
    fn block_options() {
        let mut p = packet(MessageType::Confirmable, RequestType::Put, &["t", "a", "b"], &[], None);
        assert_eq!(block1(&p), Ok(None));
        // 0x0e: NUM 0, M 1, SZX 6 (1024 bytes) — what libcoap sends for a 1500-byte PUT.
        p.add_option(CoapOption::Block1, vec![0x0e]);
        let block = block1(&p).unwrap().unwrap();
        assert_eq!(block, Block { num: 0, more: true, szx: 6 });
        assert_eq!(block.size(), 1024);
        assert_eq!(block.encode(), vec![0x0e]);
        assert_eq!(Block { num: 1, more: false, szx: 6 }.encode(), vec![0x16]);
        assert_eq!(Block { num: 0, more: false, szx: 0 }.encode(), Vec::<u8>::new());
        assert_eq!(Block { num: 300, more: true, szx: 2 }.encode(), vec![0x12, 0xca]);
        p.clear_option(CoapOption::Block1);
        p.add_option(CoapOption::Block1, vec![0x12, 0xca]);
        assert_eq!(block1(&p), Ok(Some(Block { num: 300, more: true, szx: 2 })));
        p.clear_option(CoapOption::Block1);
        p.add_option(CoapOption::Block1, vec![0x07]);
        assert!(matches!(block1(&p), Err(MappingError::BadOption(_))));
        p.add_option(CoapOption::Size1, vec![0x05, 0xdc]);
        assert_eq!(size1(&p), Some(1500));
    }

    #[test]
    fn transfers_are_told_apart_by_uri_and_request_tag() {
        let a =
            packet(MessageType::Confirmable, RequestType::Put, &["t", "a", "b"], &["x=1"], None);
        let mut tagged = a.clone();
        tagged.add_option(CoapOption::Unknown(292), vec![1, 2]);
        let other =
            packet(MessageType::Confirmable, RequestType::Put, &["t", "a", "c"], &["x=1"], None);
        let split =
            packet(MessageType::Confirmable, RequestType::Put, &["t", "ab"], &["x=1"], None);
        assert_eq!(transfer_key(&a), transfer_key(&a.clone()));
        assert_ne!(transfer_key(&a), transfer_key(&tagged));
        assert_ne!(transfer_key(&a), transfer_key(&other));
        assert_ne!(transfer_key(&a), transfer_key(&split));
    }

    #[test]
    fn commands_and_their_responses() {
        let poll =
            packet(MessageType::Confirmable, RequestType::Post, &["t"], &["hono-ttd=30"], None);
        let request = request(&poll).unwrap();
        assert_eq!((request.ttd, request.short_form), (Some(Duration::from_secs(30)), true));
        let long = packet(
            MessageType::Confirmable,
            RequestType::Post,
            &["telemetry"],
            &["hono-ttd=-1"],
            None,
        );
        assert_eq!(super::request(&long).unwrap().ttd, None);
        assert!(!super::request(&long).unwrap().short_form);
        let bad =
            packet(MessageType::Confirmable, RequestType::Post, &["t"], &["hono-ttd=x"], None);
        assert!(matches!(super::request(&bad), Err(MappingError::BadOption(_))));

        let answer = packet(
            MessageType::Confirmable,
            RequestType::Post,
            &["cr", "abc"],
            &["hono-cmd-status=200"],
            Some(&[]),
        );
        let r = command_response(&answer).unwrap().unwrap();
        assert_eq!((r.request_id.as_str(), r.target, r.status), ("abc", None, 200));
        assert_eq!(r.content_type.as_deref(), Some("text/plain;charset=utf-8"));
        let gw = packet(
            MessageType::Confirmable,
            RequestType::Put,
            &["command_response", "t1", "d1", "abc"],
            &["hono-cmd-status=404"],
            None,
        );
        assert_eq!(
            command_response(&gw).unwrap().unwrap().target,
            Some(("t1".into(), "d1".into()))
        );
        // Malformed responses: method, path, query and the error expected.
        type Expected = fn(&MappingError) -> bool;
        let bad_option: Expected = |e| matches!(e, MappingError::BadOption(_));
        let bad: [(RequestType, &[&str], &[&str], Expected); 4] = [
            (RequestType::Post, &["cr", "abc"], &[], bad_option),
            (RequestType::Post, &["cr", "abc"], &["hono-cmd-status=99"], bad_option),
            (RequestType::Put, &["cr", "abc"], &["hono-cmd-status=200"], |e| {
                matches!(e, MappingError::MethodNotAllowed(_))
            }),
            (RequestType::Post, &["cr"], &["hono-cmd-status=200"], |e| {
                matches!(e, MappingError::NotFound(_))
            }),
        ];
        for (method, path, query, expected) in bad {
            let request = packet(MessageType::Confirmable, method, path, query, None);
            let error = command_response(&request).expect_err("malformed");
            assert!(expected(&error), "{path:?} {query:?}: {error:?}");
        }
        assert_eq!(command_response(&poll), Ok(None));

        assert_eq!(content_format_of("text/plain"), Some(0));
        assert_eq!(content_format_of("application/JSON"), Some(50));
        assert_eq!(content_format_of("application/vnd.oma.lwm2m+tlv"), Some(11542));
        assert_eq!(content_format_of("application/x-unknown"), None);
    }
}
