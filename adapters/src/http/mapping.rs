//! HTTP request → upload or command response: pure translation of method, path, query
//! and headers (no I/O).

use std::time::Duration;

use crate::downstream::{Endpoint, Qos};

/// What a request asks for, before authentication decides who may do it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub endpoint: Endpoint,
    /// `Some` for `PUT /ENDPOINT/TENANT/DEVICE` (gateways, unauthenticated devices).
    pub target: Option<(String, String)>,
}

/// Any resource of the adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// `POST /telemetry|event`, `PUT /telemetry|event/TENANT/DEVICE`.
    Upload(Route),
    /// `POST /command/res/REQ-ID` (the authenticated device itself) or
    /// `PUT /command/res/TENANT/DEVICE/REQ-ID` (gateways, unauthenticated devices).
    CommandResponse { request_id: String, target: Option<(String, String)> },
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
        (_, []) | (_, [_, _]) => {
            Err(MappingError::MethodNotAllowed { method: method.to_owned(), path: path.to_owned() })
        }
        _ => Err(MappingError::NotFound(path.to_owned())),
    }
}

/// Maps every resource: uploads (see [`route`]) and command responses.
pub fn resource(method: &str, path: &str) -> Result<Resource, MappingError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["command", "res", rest @ ..] => match (method, rest) {
            ("POST", [id]) if !id.is_empty() => {
                Ok(Resource::CommandResponse { request_id: decode(id)?, target: None })
            }
            ("PUT", [tenant, device, id])
                if !tenant.is_empty() && !device.is_empty() && !id.is_empty() =>
            {
                Ok(Resource::CommandResponse {
                    request_id: decode(id)?,
                    target: Some((decode(tenant)?, decode(device)?)),
                })
            }
            (_, [id]) if !id.is_empty() => Err(MappingError::MethodNotAllowed {
                method: method.to_owned(),
                path: path.to_owned(),
            }),
            (_, [tenant, device, id])
                if !tenant.is_empty() && !device.is_empty() && !id.is_empty() =>
            {
                Err(MappingError::MethodNotAllowed {
                    method: method.to_owned(),
                    path: path.to_owned(),
                })
            }
            _ => Err(MappingError::NotFound(path.to_owned())),
        },
        _ => route(method, path).map(Resource::Upload),
    }
}

/// The value of query parameter `name` (percent-decoded; `+` is a space), if present.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| decode(&value.replace('+', " ")).unwrap_or_else(|_| value.to_owned()))
    })
}

/// `hono-ttd` (header, else query parameter): seconds the device waits for a command,
/// capped at `max`. Absent, zero or negative (Hono ignores those): no wait.
pub fn ttd(
    header: Option<&str>,
    query: Option<&str>,
    max: Duration,
) -> Result<Option<Duration>, MappingError> {
    let Some(value) = header.map(str::to_owned).or_else(|| query_param(query, "hono-ttd")) else {
        return Ok(None);
    };
    let seconds = value.trim().parse::<i64>().map_err(|_| {
        MappingError::BadHeader(format!("hono-ttd must be a number of seconds, not {value:?}"))
    })?;
    Ok((seconds > 0).then(|| Duration::from_secs(seconds as u64).min(max)).filter(|d| !d.is_zero()))
}

/// `hono-cmd-status` (query parameter, else header): an HTTP status code, 200 to 599.
pub fn command_status(header: Option<&str>, query: Option<&str>) -> Result<u16, MappingError> {
    let value = query_param(query, "hono-cmd-status")
        .or_else(|| header.map(str::to_owned))
        .ok_or_else(|| MappingError::BadHeader("hono-cmd-status is required".into()))?;
    value.trim().parse::<u16>().ok().filter(|status| (200..600).contains(status)).ok_or_else(|| {
        MappingError::BadHeader(format!(
            "hono-cmd-status must be a status code 200-599, not {value:?}"
        ))
    })
}

/// One percent-decoded path segment (`+` stays `+`); a bad escape is "not found".
fn decode(segment: &str) -> Result<String, MappingError> {
    ferrule_net::text::percent_decode(segment, false)
        .ok_or_else(|| MappingError::NotFound(segment.to_owned()))
}

/// `QoS-Level` header: absent or `0` = at most once, `1` = at least once. Events are
/// always at least once.
pub fn qos(endpoint: Endpoint, header: Option<&str>) -> Result<Qos, MappingError> {
    let requested = match header.map(str::trim) {
        None => Qos::AtMostOnce,
        Some("0") => Qos::AtMostOnce,
        Some("1") => Qos::AtLeastOnce,
        Some(other) => {
            return Err(MappingError::BadHeader(format!("QoS-Level must be 0 or 1, not {other:?}")))
        }
    };
    Ok(if endpoint == Endpoint::Event { Qos::AtLeastOnce } else { requested })
}

/// `hono-ttl` header (seconds), events only.
pub fn ttl(header: Option<&str>) -> Result<Option<Duration>, MappingError> {
    header
        .map(|v| {
            v.trim().parse::<u64>().map(Duration::from_secs).map_err(|_| {
                MappingError::BadHeader(format!("hono-ttl must be a number of seconds, not {v:?}"))
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route("POST", "/telemetry").unwrap(),
            Route { endpoint: Endpoint::Telemetry, target: None }
        );
        assert_eq!(route("POST", "/event").unwrap().endpoint, Endpoint::Event);
        assert_eq!(
            route("PUT", "/telemetry/t1/dev%201").unwrap().target,
            Some(("t1".to_owned(), "dev 1".to_owned()))
        );
        assert!(matches!(route("POST", "/nothing"), Err(MappingError::NotFound(_))));
        // "%+4" is not an escape (found by the http_request fuzz target).
        assert!(matches!(route("PUT", "/telemetry/t1/dev%+4"), Err(MappingError::NotFound(_))));
        assert!(matches!(route("GET", "/telemetry"), Err(MappingError::MethodNotAllowed { .. })));
        assert!(matches!(route("PUT", "/telemetry"), Err(MappingError::MethodNotAllowed { .. })));
        assert!(matches!(route("PUT", "/telemetry/t1"), Err(MappingError::NotFound(_))));
        assert!(matches!(route("PUT", "/telemetry/t1/d/x"), Err(MappingError::NotFound(_))));
    }

    #[test]
    fn command_response_resources() {
        assert_eq!(
            resource("POST", "/command/res/abc").unwrap(),
            Resource::CommandResponse { request_id: "abc".into(), target: None }
        );
        assert_eq!(
            resource("PUT", "/command/res/t1/d%201/abc").unwrap(),
            Resource::CommandResponse {
                request_id: "abc".into(),
                target: Some(("t1".into(), "d 1".into()))
            }
        );
        assert_eq!(
            resource("POST", "/telemetry").unwrap(),
            Resource::Upload(route("POST", "/telemetry").unwrap())
        );
        assert!(matches!(
            resource("PUT", "/command/res/abc"),
            Err(MappingError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            resource("POST", "/command/res/t1/d1/abc"),
            Err(MappingError::MethodNotAllowed { .. })
        ));
        assert!(matches!(resource("POST", "/command/res"), Err(MappingError::NotFound(_))));
        assert!(matches!(resource("POST", "/command/res/"), Err(MappingError::NotFound(_))));
        assert!(matches!(resource("PUT", "/command/res/t1/d1"), Err(MappingError::NotFound(_))));
    }

    #[test]
    fn ttd_and_status() {
        let max = Duration::from_secs(60);
        assert_eq!(ttd(None, None, max).unwrap(), None);
        assert_eq!(ttd(Some("10"), None, max).unwrap(), Some(Duration::from_secs(10)));
        assert_eq!(ttd(None, Some("a=1&hono-ttd=5"), max).unwrap(), Some(Duration::from_secs(5)));
        assert_eq!(
            ttd(Some("7"), Some("hono-ttd=5"), max).unwrap(),
            Some(Duration::from_secs(7)),
            "header first"
        );
        assert_eq!(ttd(Some("600"), None, max).unwrap(), Some(max), "capped");
        assert_eq!(ttd(Some("-1"), None, max).unwrap(), None);
        assert_eq!(ttd(Some("0"), None, max).unwrap(), None);
        assert!(ttd(Some("soon"), None, max).is_err());
        assert_eq!(command_status(None, Some("hono-cmd-status=200")).unwrap(), 200);
        assert_eq!(command_status(Some("404"), None).unwrap(), 404);
        assert!(command_status(None, None).is_err());
        assert!(command_status(None, Some("hono-cmd-status=42")).is_err());
        assert!(command_status(None, Some("hono-cmd-status=x")).is_err());
        assert_eq!(query_param(Some("x=a%20b+c"), "x").as_deref(), Some("a b c"));
    }

    #[test]
    fn headers() {
        assert_eq!(qos(Endpoint::Telemetry, None).unwrap(), Qos::AtMostOnce);
        assert_eq!(qos(Endpoint::Telemetry, Some("1")).unwrap(), Qos::AtLeastOnce);
        assert_eq!(qos(Endpoint::Event, Some("0")).unwrap(), Qos::AtLeastOnce);
        assert!(qos(Endpoint::Telemetry, Some("2")).is_err());
        assert_eq!(ttl(Some("30")).unwrap(), Some(Duration::from_secs(30)));
        assert!(ttl(Some("soon")).is_err());
    }
}
