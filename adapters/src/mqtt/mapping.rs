//! Hono's MQTT topic scheme, translated to endpoints, tenants and devices (pure: no I/O).
//!
//! Publish topics: `telemetry` | `t` | `event` | `e`, optionally followed by
//! `/TENANT/DEVICE` (tenant may be empty: `t//DEVICE`), optionally followed by a property
//! bag `/?name=value&...` (URL-encoded). Error topic filters: `error/[TENANT]/[DEVICE]/#`
//! (or `e/...`); error messages go to `error/[TENANT]/[DEVICE]/ENDPOINT/CORRELATION/CODE`.
//! Command filters: `command/[TENANT]/[DEVICE]/req/#` (short `c/[TENANT]/[DEVICE]/q/#`);
//! commands go to `command/[TENANT]/[DEVICE]/req/REQ-ID/NAME` in the filter's spelling;
//! responses come on `command/[TENANT]/[DEVICE]/res/REQ-ID/STATUS` (`c/.../s/...`).

use std::time::Duration;

use crate::downstream::Endpoint;

/// Property-bag key for the content type.
pub const CONTENT_TYPE: &str = "content-type";
/// Property-bag key for an event's time to live, in seconds.
pub const HONO_TTL: &str = "hono-ttl";
/// Property-bag key overriding how errors are handled.
pub const ON_ERROR: &str = "on-error";
/// Property-bag key for the correlation id used in error messages.
pub const CORRELATION_ID: &str = "correlation-id";

/// Why a topic does not name something this adapter serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// The first segment is not `telemetry`, `t`, `event` or `e`.
    #[error("unknown endpoint in topic {0:?}")]
    UnknownEndpoint(String),
    /// Wrong number of segments, or an empty device id.
    #[error("malformed topic {0:?}: expected ENDPOINT[/TENANT/DEVICE][/?PROPERTIES]")]
    MalformedTopic(String),
    /// A property bag that does not decode (bad `%` escape, not UTF-8).
    #[error("malformed property bag: {0}")]
    BadPropertyBag(String),
    /// `hono-ttl` that is not a number of seconds.
    #[error("hono-ttl must be a whole number of seconds, got {0:?}")]
    BadTtl(String),
    /// `on-error` with an unknown value.
    #[error("unknown on-error value {0:?}")]
    BadOnError(String),
    /// A command response topic whose status is not an HTTP-style code (200-599).
    #[error("command response status must be a number from 200 to 599, got {0:?}")]
    BadStatus(String),
    /// A command response topic whose request id was not issued by Ferrule.
    #[error("malformed command request id: {0}")]
    BadRequestId(String),
}

/// The `on-error` property-bag parameter (Hono's error handling table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Disconnect, unless the device subscribed to the error topic (then: report and ack).
    #[default]
    Default,
    /// Always disconnect (after reporting on the error topic, if subscribed).
    Disconnect,
    /// Acknowledge the publish anyway (after reporting on the error topic, if subscribed).
    Ignore,
    /// Do not acknowledge; keep the connection.
    SkipAck,
}

/// The recognised parts of a property bag; the rest travels downstream as application
/// properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PropertyBag {
    pub content_type: Option<String>,
    pub ttl: Option<Duration>,
    pub on_error: OnError,
    pub correlation_id: Option<String>,
    pub other: Vec<(String, String)>,
}

/// What a publish topic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishAddress {
    pub endpoint: Endpoint,
    /// `Some` only when the topic names one (`t/TENANT/D`); `t//D` leaves it to the session.
    pub tenant: Option<String>,
    /// `Some` for the gateway / unauthenticated forms.
    pub device: Option<String>,
    pub properties: PropertyBag,
}

/// Parses a publish topic.
///
/// # Errors
/// [`MappingError`] when the topic is not one of Hono's telemetry/event topics.
pub fn parse_publish_topic(topic: &str) -> Result<PublishAddress, MappingError> {
    let (path, bag) = match topic.find("/?") {
        Some(at) => (&topic[..at], Some(&topic[at + 2..])),
        None => (topic, None),
    };
    let mut segments = path.split('/');
    let endpoint = match segments.next().unwrap_or_default() {
        "telemetry" | "t" => Endpoint::Telemetry,
        "event" | "e" => Endpoint::Event,
        _ => return Err(MappingError::UnknownEndpoint(topic.to_owned())),
    };
    let rest: Vec<&str> = segments.collect();
    let (tenant, device) = match rest.as_slice() {
        [] => (None, None),
        [tenant, device] if !device.is_empty() => {
            let tenant = (!tenant.is_empty()).then(|| (*tenant).to_owned());
            (tenant, Some((*device).to_owned()))
        }
        _ => return Err(MappingError::MalformedTopic(topic.to_owned())),
    };
    let properties = match bag {
        Some(bag) => parse_property_bag(bag)?,
        None => PropertyBag::default(),
    };
    Ok(PublishAddress { endpoint, tenant, device, properties })
}

/// The property bag of any topic (also one that is otherwise invalid), so that `on-error`
/// and `correlation-id` still apply to the error about it.
pub fn property_bag_of(topic: &str) -> Option<PropertyBag> {
    let at = topic.find("/?")?;
    parse_property_bag(&topic[at + 2..]).ok()
}

/// The first topic segment, as the device spelled it (used in error topics).
pub fn endpoint_segment(topic: &str) -> &str {
    topic.split(['/', '?']).next().unwrap_or_default()
}

/// Parses `name=value&...` (URL-encoded; `+` is a space, as in HTML forms).
///
/// # Errors
/// [`MappingError::BadPropertyBag`], [`MappingError::BadTtl`], [`MappingError::BadOnError`].
pub fn parse_property_bag(bag: &str) -> Result<PropertyBag, MappingError> {
    let mut out = PropertyBag::default();
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = url_decode(name)?;
        let value = url_decode(value)?;
        match name.as_str() {
            CONTENT_TYPE => out.content_type = Some(value).filter(|v| !v.is_empty()),
            HONO_TTL => {
                let secs = value.parse::<u64>().map_err(|_| MappingError::BadTtl(value.clone()))?;
                out.ttl = Some(Duration::from_secs(secs));
            }
            ON_ERROR => {
                out.on_error = match value.as_str() {
                    "" | "default" => OnError::Default,
                    "disconnect" => OnError::Disconnect,
                    "ignore" => OnError::Ignore,
                    "skip-ack" => OnError::SkipAck,
                    _ => return Err(MappingError::BadOnError(value)),
                }
            }
            CORRELATION_ID => out.correlation_id = Some(value),
            _ => out.other.push((name, value)),
        }
    }
    Ok(out)
}

/// Percent-decoding (`%41` → `A`, `+` → space) into UTF-8; an escape is exactly two hex
/// digits.
pub fn url_decode(s: &str) -> Result<String, MappingError> {
    ferrule_net::text::percent_decode(s, true)
        .ok_or_else(|| MappingError::BadPropertyBag(format!("cannot decode {s:?}")))
}

/// Which devices' errors a subscription asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceFilter {
    /// `error///#` or `error/T//#`: the connected device itself.
    Own,
    /// `error//+/#`: every device the gateway publishes for (and itself).
    Any,
    /// `error//D/#`: one device.
    One(String),
}

/// A parsed error topic filter (`error/[TENANT]/[DEVICE]/#`, short `e/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorSubscription {
    /// `error` or `e`, echoed in the error topic.
    pub long: bool,
    /// Tenant named in the filter (echoed in the error topic).
    pub tenant: Option<String>,
    pub device: DeviceFilter,
}

impl ErrorSubscription {
    /// Whether an error for `device` (published by `own`) goes to this subscription.
    pub fn matches(&self, device: &str, own: Option<&str>) -> bool {
        match &self.device {
            DeviceFilter::Own => own.is_none_or(|own| own == device),
            DeviceFilter::Any => true,
            DeviceFilter::One(d) => d == device,
        }
    }

    /// The topic the error message `report` is published to.
    pub fn error_topic(&self, report: &ErrorReport) -> String {
        let prefix = if self.long { "error" } else { "e" };
        let tenant = if self.tenant.is_some() { report.tenant } else { "" };
        let device = match self.device {
            DeviceFilter::Own => "",
            DeviceFilter::Any | DeviceFilter::One(_) => report.device,
        };
        let ErrorReport { endpoint, correlation_id, code, .. } = report;
        format!("{prefix}/{tenant}/{device}/{endpoint}/{correlation_id}/{code}")
    }
}

/// What an error message reports: a failed publish for `device` (Hono's error topic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReport<'a> {
    pub tenant: &'a str,
    pub device: &'a str,
    /// The publish's endpoint segment as the device spelled it (`telemetry`, `e`, ...).
    pub endpoint: &'a str,
    /// The publish's correlation id (its packet id, or `-1` for QoS 0).
    pub correlation_id: &'a str,
    /// The HTTP-style status of the failure.
    pub code: u16,
}

/// Parses a SUBSCRIBE topic filter; `None` if it is not an error topic filter.
pub fn parse_error_filter(filter: &str) -> Option<ErrorSubscription> {
    let segments: Vec<&str> = filter.split('/').collect();
    let [prefix, tenant, device, "#"] = segments.as_slice() else { return None };
    let long = match *prefix {
        "error" => true,
        "e" => false,
        _ => return None,
    };
    let (tenant, device) = filter_scope(tenant, device)?;
    Some(ErrorSubscription { long, tenant, device })
}

/// A parsed command subscription filter (`command/[TENANT]/[DEVICE]/req/#`, short
/// `c/[TENANT]/[DEVICE]/q/#`). Commands are published in the same spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandFilter {
    /// `command`/`req` or `c`/`q`.
    pub long: bool,
    /// Tenant named in the filter (echoed in command topics).
    pub tenant: Option<String>,
    /// `Own` (`command///req/#`), `Any` (a gateway's `command//+/req/#`) or `One(D)`.
    pub device: DeviceFilter,
}

impl CommandFilter {
    /// The topic a command for `device` is published on; one-way commands have an empty
    /// request id (`command///req//NAME`). Gateway forms carry the device id.
    pub fn command_topic(
        &self,
        tenant: &str,
        device: &str,
        request_id: Option<&str>,
        name: &str,
    ) -> String {
        let (prefix, req) = if self.long { ("command", "req") } else { ("c", "q") };
        let tenant = if self.tenant.is_some() { tenant } else { "" };
        let device = match self.device {
            DeviceFilter::Own => "",
            DeviceFilter::Any | DeviceFilter::One(_) => device,
        };
        format!("{prefix}/{tenant}/{device}/{req}/{}/{name}", request_id.unwrap_or_default())
    }
}

/// Whether a command name can be a topic level (MQTT topic names carry no wildcards and
/// no NUL; `/` would only add levels, which Hono allows).
pub fn valid_command_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['+', '#', '\0'])
}

/// The tenant and device levels of an error or command filter: the tenant named (or not)
/// and whose messages the filter selects; `None` where a level holds a wildcard that Hono
/// does not allow there (only a whole-level `+` for the device).
fn filter_scope(tenant: &str, device: &str) -> Option<(Option<String>, DeviceFilter)> {
    if tenant.contains(['+', '#']) || device.contains('#') {
        return None;
    }
    let device = match device {
        "" => DeviceFilter::Own,
        "+" => DeviceFilter::Any,
        d if d.contains('+') => return None,
        d => DeviceFilter::One(d.to_owned()),
    };
    Some(((!tenant.is_empty()).then(|| tenant.to_owned()), device))
}

/// Parses a SUBSCRIBE topic filter; `None` if it is not a command filter.
pub fn parse_command_filter(filter: &str) -> Option<CommandFilter> {
    let segments: Vec<&str> = filter.split('/').collect();
    let [prefix, tenant, device, req, "#"] = segments.as_slice() else { return None };
    let long = match (*prefix, *req) {
        ("command", "req") => true,
        ("c", "q") => false,
        _ => return None,
    };
    let (tenant, device) = filter_scope(tenant, device)?;
    Some(CommandFilter { long, tenant, device })
}

/// A device's answer to a command, from its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseAddress {
    /// `Some` only when the topic names one.
    pub tenant: Option<String>,
    /// `Some` for the gateway form `command//DEVICE/res/...`.
    pub device: Option<String>,
    pub request_id: String,
    pub status: u16,
    pub properties: PropertyBag,
}

/// Parses a command response topic; `None` if the topic is not under `command/` or `c/`
/// (then it is a telemetry/event topic or unknown).
///
/// # Errors
/// [`MappingError::MalformedTopic`], [`MappingError::BadStatus`],
/// [`MappingError::BadRequestId`] and property-bag errors.
pub fn parse_response_topic(topic: &str) -> Option<Result<ResponseAddress, MappingError>> {
    let (path, bag) = match topic.find("/?") {
        Some(at) => (&topic[..at], Some(&topic[at + 2..])),
        None => (topic, None),
    };
    let segments: Vec<&str> = path.split('/').collect();
    let res = match segments.first() {
        Some(&"command") => "res",
        Some(&"c") => "s",
        _ => return None,
    };
    let malformed = || MappingError::MalformedTopic(topic.to_owned());
    let parse = || {
        let [_, tenant, device, r, request_id, status] = segments.as_slice() else {
            return Err(malformed());
        };
        if *r != res || request_id.is_empty() {
            return Err(malformed());
        }
        let status = status
            .parse::<u16>()
            .ok()
            .filter(|s| (200..600).contains(s))
            .ok_or_else(|| MappingError::BadStatus((*status).to_owned()))?;
        ferrule_command_control::RequestId::check_form(request_id)
            .map_err(|e| MappingError::BadRequestId(e.to_string()))?;
        let properties = match bag {
            Some(bag) => parse_property_bag(bag)?,
            None => PropertyBag::default(),
        };
        Ok(ResponseAddress {
            tenant: (!tenant.is_empty()).then(|| (*tenant).to_owned()),
            device: (!device.is_empty()).then(|| (*device).to_owned()),
            request_id: (*request_id).to_owned(),
            status,
            properties,
        })
    };
    Some(parse())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(topic: &str) -> PublishAddress {
        parse_publish_topic(topic).unwrap_or_else(|e| panic!("{topic}: {e}"))
    }

    #[test]
    fn percent_escapes_are_two_hex_digits() {
        assert_eq!(url_decode("a%41+b").unwrap(), "aA b");
        // "%+4" is not an escape (found by the mqtt_topic fuzz target).
        assert!(url_decode("%+4").is_err());
        assert!(url_decode("%4").is_err());
    }

    #[test]
    fn device_forms() {
        for (topic, endpoint) in [
            ("telemetry", Endpoint::Telemetry),
            ("t", Endpoint::Telemetry),
            ("event", Endpoint::Event),
            ("e", Endpoint::Event),
        ] {
            let a = parse(topic);
            assert_eq!((a.endpoint, a.tenant, a.device), (endpoint, None, None), "{topic}");
        }
    }

    #[test]
    fn gateway_and_unauthenticated_forms() {
        let a = parse("t//dev-1");
        assert_eq!((a.tenant, a.device.as_deref()), (None, Some("dev-1")));
        let a = parse("event/tenant-a/dev-2");
        assert_eq!(
            (a.endpoint, a.tenant.as_deref(), a.device.as_deref()),
            (Endpoint::Event, Some("tenant-a"), Some("dev-2"))
        );
    }

    #[test]
    fn property_bag() {
        let a = parse("e/?content-type=application%2Fjson&hono-ttl=30&seq+no=7&correlation-id=abc&on-error=ignore");
        assert_eq!(a.endpoint, Endpoint::Event);
        let p = a.properties;
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.ttl, Some(Duration::from_secs(30)));
        assert_eq!(p.correlation_id.as_deref(), Some("abc"));
        assert_eq!(p.on_error, OnError::Ignore);
        assert_eq!(p.other, vec![("seq no".to_owned(), "7".to_owned())]);
        let a = parse("t/t1/d1/?content-type=text%2Fplain");
        assert_eq!((a.tenant.as_deref(), a.device.as_deref()), (Some("t1"), Some("d1")));
        assert_eq!(a.properties.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn bad_topics() {
        assert!(matches!(parse_publish_topic("foo"), Err(MappingError::UnknownEndpoint(_))));
        assert!(matches!(parse_publish_topic("telemetryx"), Err(MappingError::UnknownEndpoint(_))));
        assert!(matches!(parse_publish_topic(""), Err(MappingError::UnknownEndpoint(_))));
        for topic in ["t/", "t/a", "t/a/", "t//", "t/a/b/c", "e/a/b/c/?x=1"] {
            assert!(
                matches!(parse_publish_topic(topic), Err(MappingError::MalformedTopic(_))),
                "{topic}"
            );
        }
        assert!(matches!(parse_publish_topic("t/?hono-ttl=soon"), Err(MappingError::BadTtl(_))));
        assert!(matches!(parse_publish_topic("t/?a=%zz"), Err(MappingError::BadPropertyBag(_))));
        assert!(matches!(parse_publish_topic("t/?a=%e2%82"), Err(MappingError::BadPropertyBag(_))));
        assert!(matches!(parse_publish_topic("t/?a=%4"), Err(MappingError::BadPropertyBag(_))));
        assert!(matches!(
            parse_publish_topic("t/?on-error=shout"),
            Err(MappingError::BadOnError(_))
        ));
    }

    #[test]
    fn endpoint_segment_as_spelled() {
        assert_eq!(endpoint_segment("t/?x=1"), "t");
        assert_eq!(endpoint_segment("event//d"), "event");
        assert_eq!(endpoint_segment("bogus"), "bogus");
        let bag = property_bag_of("bogus/?on-error=disconnect&correlation-id=9").expect("bag");
        assert_eq!((bag.on_error, bag.correlation_id.as_deref()), (OnError::Disconnect, Some("9")));
        assert_eq!(property_bag_of("bogus"), None);
    }

    #[test]
    fn error_filters() {
        let s = parse_error_filter("error///#").expect("valid");
        assert_eq!(s, ErrorSubscription { long: true, tenant: None, device: DeviceFilter::Own });
        let report = |device, endpoint, correlation_id, code| ErrorReport {
            tenant: "t1",
            device,
            endpoint,
            correlation_id,
            code,
        };
        assert_eq!(s.error_topic(&report("d1", "telemetry", "7", 503)), "error///telemetry/7/503");
        let s = parse_error_filter("e/t1/+/#").expect("valid");
        assert_eq!(s.device, DeviceFilter::Any);
        assert_eq!(s.error_topic(&report("d9", "e", "-1", 403)), "e/t1/d9/e/-1/403");
        assert!(s.matches("d9", Some("gw")));
        let s = parse_error_filter("error//d2/#").expect("valid");
        assert!(s.matches("d2", Some("gw")) && !s.matches("d3", Some("gw")));
        let own = parse_error_filter("e///#").expect("valid");
        assert!(own.matches("d1", Some("d1")) && !own.matches("d2", Some("d1")));
        for bad in
            ["error/#", "error///", "err///#", "error/+//#", "error//a+/#", "command///req/#"]
        {
            assert_eq!(parse_error_filter(bad), None, "{bad}");
        }
    }

    #[test]
    fn command_filters_and_topics() {
        let own = parse_command_filter("command///req/#").expect("valid");
        assert_eq!(own, CommandFilter { long: true, tenant: None, device: DeviceFilter::Own });
        assert_eq!(own.command_topic("t1", "d1", Some("R1"), "light"), "command///req/R1/light");
        assert_eq!(own.command_topic("t1", "d1", None, "light"), "command///req//light", "one-way");
        let short = parse_command_filter("c///q/#").expect("valid");
        assert_eq!(short.command_topic("t1", "d1", Some("R"), "x"), "c///q/R/x");
        let all = parse_command_filter("c//+/q/#").expect("valid");
        assert_eq!(all.device, DeviceFilter::Any);
        assert_eq!(all.command_topic("t1", "child", Some("R"), "x"), "c//child/q/R/x");
        let one = parse_command_filter("command/t1/child/req/#").expect("valid");
        assert_eq!(one.device, DeviceFilter::One("child".into()));
        assert_eq!(one.command_topic("t1", "child", None, "x"), "command/t1/child/req//x");
        assert!(
            valid_command_name("set/volume")
                && !valid_command_name("a+b")
                && !valid_command_name("#")
                && !valid_command_name("")
        );
        for bad in [
            "command///req",
            "command///q/#",
            "c///req/#",
            "command/+//req/#",
            "command//a+/req/#",
            "error///#",
            "cmd///req/#",
        ] {
            assert_eq!(parse_command_filter(bad), None, "{bad}");
        }
    }

    #[test]
    fn response_topics() {
        use fe2o3_amqp::types::messaging::MessageId;
        use ferrule_command_control::RequestId;
        let id =
            RequestId { correlation_id: MessageId::String("m1".into()), reply_id: "app".into() }
                .seal(&ferrule_command_control::RequestKey::random(), "t", "d")
                .unwrap();
        let r = parse_response_topic(&format!("command///res/{id}/200"))
            .expect("a command topic")
            .expect("valid");
        assert_eq!(
            (r.tenant, r.device, r.request_id.as_str(), r.status),
            (None, None, id.as_str(), 200)
        );
        let r = parse_response_topic(&format!("c//child/s/{id}/503/?content-type=text%2Fplain"))
            .unwrap()
            .unwrap();
        assert_eq!((r.device.as_deref(), r.status), (Some("child"), 503));
        assert_eq!(r.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(parse_response_topic("telemetry"), None);
        assert_eq!(parse_response_topic("t//d"), None);
        assert!(matches!(
            parse_response_topic(&format!("command///res/{id}/ok")),
            Some(Err(MappingError::BadStatus(_)))
        ));
        assert!(matches!(
            parse_response_topic(&format!("command///res/{id}/700")),
            Some(Err(MappingError::BadStatus(_)))
        ));
        assert!(matches!(
            parse_response_topic("command///res/!!/200"),
            Some(Err(MappingError::BadRequestId(_)))
        ));
        for bad in [
            "command///res//200".to_owned(),
            format!("command///s/{id}/200"),
            format!("c///res/{id}/200"),
            "command///req/x/y".to_owned(),
            "c/x".to_owned(),
        ] {
            assert!(
                matches!(parse_response_topic(&bad), Some(Err(MappingError::MalformedTopic(_)))),
                "{bad}"
            );
        }
    }
}
