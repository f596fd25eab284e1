//! HTTP request → upload: pure translation of method, path and headers (no I/O).

use std::time::Duration;

use crate::downstream::{Endpoint, Qos};

/// What a request asks for, before authentication decides who may do it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub endpoint: Endpoint,
    /// `Some` for `PUT /ENDPOINT/TENANT/DEVICE` (gateways, unauthenticated devices).
    pub target: Option<(String, String)>,
}

/// Why a request cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("no such resource: {0}")]
    NotFound(String),
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    BadHeader(String),
}

/// Maps `POST /telemetry`, `POST /event`, `PUT /telemetry/TENANT/DEVICE`, `PUT /event/TENANT/DEVICE`.
pub fn route(method: &str, path: &str) -> Result<Route, MappingError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let endpoint = match segments.first().copied() {
        Some("telemetry") => Endpoint::Telemetry,
        Some("event") => Endpoint::Event,
        _ => return Err(MappingError::NotFound(path.to_owned())),
    };
    match (method, &segments[1..]) {
        ("POST", []) => Ok(Route { endpoint, target: None }),
        ("PUT", [tenant, device]) if !tenant.is_empty() && !device.is_empty() => {
            Ok(Route { endpoint, target: Some((decode(tenant)?, decode(device)?)) })
        }
        (_, []) | (_, [_, _]) => Err(MappingError::MethodNotAllowed { method: method.to_owned(), path: path.to_owned() }),
        _ => Err(MappingError::NotFound(path.to_owned())),
    }
}

fn decode(segment: &str) -> Result<String, MappingError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(byte.ok_or_else(|| MappingError::NotFound(segment.to_owned()))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| MappingError::NotFound(segment.to_owned()))
}

/// `QoS-Level` header: absent or `0` = at most once, `1` = at least once. Events are
/// always at least once.
pub fn qos(endpoint: Endpoint, header: Option<&str>) -> Result<Qos, MappingError> {
    let requested = match header.map(str::trim) {
        None => Qos::AtMostOnce,
        Some("0") => Qos::AtMostOnce,
        Some("1") => Qos::AtLeastOnce,
        Some(other) => return Err(MappingError::BadHeader(format!("QoS-Level must be 0 or 1, not {other:?}"))),
    };
    Ok(if endpoint == Endpoint::Event { Qos::AtLeastOnce } else { requested })
}

/// `hono-ttl` header (seconds), events only.
pub fn ttl(header: Option<&str>) -> Result<Option<Duration>, MappingError> {
    header
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| MappingError::BadHeader(format!("hono-ttl must be a number of seconds, not {v:?}")))
        })
        .transpose()
}

/// Splits `auth-id@tenant` (Hono's username form). The tenant is after the last `@`.
pub fn split_username(username: &str) -> Option<(&str, &str)> {
    let (auth_id, tenant) = username.rsplit_once('@')?;
    (!auth_id.is_empty() && !tenant.is_empty()).then_some((auth_id, tenant))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("POST", "/telemetry").unwrap(), Route { endpoint: Endpoint::Telemetry, target: None });
        assert_eq!(route("POST", "/event").unwrap().endpoint, Endpoint::Event);
        assert_eq!(
            route("PUT", "/telemetry/t1/dev%201").unwrap().target,
            Some(("t1".to_owned(), "dev 1".to_owned()))
        );
        assert!(matches!(route("POST", "/nothing"), Err(MappingError::NotFound(_))));
        assert!(matches!(route("GET", "/telemetry"), Err(MappingError::MethodNotAllowed { .. })));
        assert!(matches!(route("PUT", "/telemetry"), Err(MappingError::MethodNotAllowed { .. })));
        assert!(matches!(route("PUT", "/telemetry/t1"), Err(MappingError::NotFound(_))));
        assert!(matches!(route("PUT", "/telemetry/t1/d/x"), Err(MappingError::NotFound(_))));
    }

    #[test]
    fn headers() {
        assert_eq!(qos(Endpoint::Telemetry, None).unwrap(), Qos::AtMostOnce);
        assert_eq!(qos(Endpoint::Telemetry, Some("1")).unwrap(), Qos::AtLeastOnce);
        assert_eq!(qos(Endpoint::Event, Some("0")).unwrap(), Qos::AtLeastOnce);
        assert!(qos(Endpoint::Telemetry, Some("2")).is_err());
        assert_eq!(ttl(Some("30")).unwrap(), Some(Duration::from_secs(30)));
        assert!(ttl(Some("soon")).is_err());
        assert_eq!(split_username("sensor@acme@t1"), Some(("sensor@acme", "t1")));
        assert_eq!(split_username("nobody"), None);
    }
}
