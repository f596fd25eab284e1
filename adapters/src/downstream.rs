//! Turning a device's upload into a Hono downstream message and handing it to the
//! messaging core. Shared by every adapter, so telemetry and events look the same
//! whichever protocol they came in on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Header, MessageAnnotations, Properties};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use ferrule_messaging::message::{condition, data_message, now_millis};
use ferrule_messaging::{Broker, Message, Outcome};

use crate::quota::{MessageDefaults, TenantLimits, Volumes};
pub use crate::rates::RateLimits;
use crate::rates::Rates;
use ferrule_command_control::presence::Presence;
use ferrule_net::trace::Tracer;

/// Content type of an empty notification (Hono).
pub const EMPTY_NOTIFICATION: &str = "application/vnd.eclipse-hono-empty-notification";
/// Content type of connection events (Hono).
pub const CONNECTION_EVENT: &str = "application/vnd.eclipse-hono-dc-notification+json";

/// Telemetry or event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Telemetry,
    Event,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Telemetry => "telemetry",
            Endpoint::Event => "event",
        }
    }
}

/// Delivery guarantee the device asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Fire and forget: dropped (and counted) when nobody consumes.
    AtMostOnce,
    /// Acknowledged to the device only once the messaging core accepted it.
    AtLeastOnce,
}

/// One message from a device, in protocol-neutral form.
#[derive(Debug, Clone)]
pub struct Upload {
    pub tenant: String,
    pub device_id: String,
    pub endpoint: Endpoint,
    pub qos: Qos,
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// Time to live (events; MQTT 5 message expiry).
    pub ttl: Option<Duration>,
    /// `hono-mqtt`, `hono-http`, `hono-coap`.
    pub orig_adapter: &'static str,
    /// The topic or URI path the device used.
    pub orig_address: String,
    /// Extra application properties (MQTT property bag).
    pub properties: Vec<(String, String)>,
    /// The tenant's limits, as the registry gave them for this request (the data volume).
    pub limits: TenantLimits,
    /// The device asked for the message to be retained (MQTT): passed on as the message
    /// annotation `x-opt-retain` (Hono), nothing is retained.
    pub retain: bool,
    /// The tenant's defaults for the message.
    pub defaults: Option<Arc<MessageDefaults>>,
    /// How long the device waits for a command after this message (HTTP, CoAP `hono-ttd`):
    /// the application property `ttd` (seconds), as Hono sets it.
    pub ttd: Option<Duration>,
    /// The gateway that sent it for the device (`None`: the device itself).
    pub gateway: Option<String>,
    /// When the adapter's registry look-up for it started and ended (ns since the epoch):
    /// a child span of the upload's when traced.
    pub lookup_ns: Option<(u64, u64)>,
}

/// Why an upload was not taken. Each adapter maps these to its protocol in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// No application consumer with credit (direct telemetry): HTTP 503 / CoAP 5.03.
    #[error("no consumer for {0}")]
    NoConsumer(String),
    /// A queue is full or a resource limit was hit: HTTP 503 / CoAP 5.03.
    #[error("{0}")]
    Overloaded(String),
    /// An empty payload without a content type.
    #[error("an empty payload needs a content type")]
    EmptyWithoutContentType,
    /// Payload over the adapter's maximum.
    #[error("payload of {size} bytes exceeds the maximum of {max}")]
    TooLarge { size: usize, max: usize },
    /// Refused by the messaging core for another reason.
    #[error("refused downstream: {0}")]
    Refused(String),
    /// Over a message rate limit ([`RateLimits`]): HTTP 429 / CoAP 4.29 / MQTT 5 PUBACK
    /// 0x97.
    #[error("{0}")]
    RateLimited(String),
    /// The tenant's data volume for the period is used up (`resource-limits.data-volume`):
    /// HTTP 429 / CoAP 4.29 / MQTT 5 PUBACK 0x97, as Hono.
    #[error("the tenant's data volume for this period is used up")]
    VolumeExceeded,
}

impl UploadError {
    /// True where the device should retry later (503 family).
    pub fn is_transient(&self) -> bool {
        matches!(self, UploadError::NoConsumer(_) | UploadError::Overloaded(_))
    }
}

/// Counters of one adapter's downstream traffic.
#[derive(Debug, Default)]
pub struct DownstreamStats {
    pub accepted: AtomicU64,
    /// QoS 0 / NON messages nobody consumed.
    pub dropped: AtomicU64,
    pub refused: AtomicU64,
}

/// Sends uploads into the messaging core (in process).
#[derive(Clone)]
pub struct Downstream {
    broker: Broker,
    pub stats: Arc<DownstreamStats>,
    rates: Arc<Rates>,
    volumes: Arc<Volumes>,
    presence: Option<Arc<Presence>>,
    tracer: Tracer,
}

impl Downstream {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            stats: Arc::default(),
            rates: Arc::default(),
            volumes: Arc::default(),
            presence: None,
            tracer: Tracer::disabled(),
        }
    }

    /// This downstream recording a span per upload into `tracer`, and giving each message
    /// its `traceparent` (W3C trace context, as Hono 2.5+).
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// This downstream reporting where devices were seen to `presence`.
    pub fn with_presence(mut self, presence: Arc<Presence>) -> Self {
        self.presence = Some(presence);
        self
    }

    /// Whether uploads are traced: only then do the adapters time their registry look-ups
    /// (no clock reads per message otherwise).
    pub fn tracing(&self) -> bool {
        self.tracer.enabled()
    }

    /// Where devices were seen (`None`: not tracked).
    pub fn presence(&self) -> Option<&Arc<Presence>> {
        self.presence.as_ref()
    }

    /// The data volume each tenant used in its period (shared by every adapter).
    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// This downstream refusing messages over `limits` (all adapters that share it) for
    /// tenants that set no rates of their own.
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Self {
        self.rates = Arc::new(Rates::new(limits));
        self
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The shared rules every adapter applies before sending.
    pub fn validate(
        payload: &[u8],
        content_type: Option<&str>,
        max_payload: usize,
    ) -> Result<(), UploadError> {
        if payload.len() > max_payload {
            return Err(UploadError::TooLarge { size: payload.len(), max: max_payload });
        }
        if payload.is_empty() && content_type.is_none_or(str::is_empty) {
            return Err(UploadError::EmptyWithoutContentType);
        }
        Ok(())
    }

    /// Sends one upload. For at-least-once uploads this returns once the messaging core
    /// accepted the message (a consumer took it, or it is on disk); for at-most-once ones
    /// as soon as it is routed.
    pub async fn send(&self, upload: Upload) -> Result<(), UploadError> {
        self.send_reporting_drops(upload, false).await
    }

    /// Like [`Downstream::send`], but an at-most-once upload that nobody consumed is an
    /// error too when `report` is set (HTTP answers 503 even for QoS 0).
    pub async fn send_reporting_drops(
        &self,
        upload: Upload,
        report: bool,
    ) -> Result<(), UploadError> {
        self.submit(upload, report, true).await
    }

    /// Sends a message the platform makes on a device's behalf (a connection event): not
    /// counted against the device's message rate.
    pub async fn send_notification(&self, upload: Upload) -> Result<(), UploadError> {
        self.submit(upload, false, false).await
    }

    async fn submit(
        &self,
        mut upload: Upload,
        report: bool,
        rated: bool,
    ) -> Result<(), UploadError> {
        let started = std::time::Instant::now();
        upload.apply_tenant_terms();
        if let Some(presence) = self.presence.as_ref().filter(|_| rated) {
            presence.seen(
                &upload.tenant,
                &upload.device_id,
                upload.orig_adapter,
                upload.gateway.as_deref(),
            );
        }
        if rated {
            let limits = RateLimits {
                per_device: upload.limits.rate_per_device.or(self.rates.limits.per_device),
                per_tenant: upload.limits.rate_per_tenant.or(self.rates.limits.per_tenant),
            };
            if let Err(limit) = self.rates.take(&upload.tenant, &upload.device_id, limits) {
                crate::door::limit_refused(&upload.tenant, upload.orig_adapter, limit);
                let what = if limit == "device_rate" { "device" } else { "tenant" };
                let result = Err(UploadError::RateLimited(format!(
                    "the {what}'s message rate limit is reached; retry later"
                )));
                record(&upload, &result, false, started.elapsed());
                return result;
            }
        }
        // The data volume is counted up front (concurrent uploads cannot overrun it) and
        // given back for a message that was not taken.
        let volume = upload.limits.data_volume.filter(|_| rated).map(|limit| {
            (limit, upload.limits.charged_size(upload.payload.len()), crate::quota::now_secs())
        });
        if let Some((limit, size, now)) = volume {
            if !self.volumes.charge(&upload.tenant, &limit, size, now) {
                crate::door::limit_refused(&upload.tenant, upload.orig_adapter, "data_volume");
                let result = Err(UploadError::VolumeExceeded);
                record(&upload, &result, false, started.elapsed());
                return result;
            }
        }
        let endpoint = upload.endpoint.as_str();
        let mut address = String::with_capacity(endpoint.len() + 1 + upload.tenant.len());
        address.extend([endpoint, "/", &upload.tenant]);
        let settled = upload.qos == Qos::AtMostOnce;
        let mut message = to_message(&address, &upload);
        // A device's own trace context (a `traceparent` property) is continued; otherwise a
        // trace starts here, sampled as the tenant says.
        let incoming = || {
            upload
                .properties
                .iter()
                .find(|(k, _)| k == ferrule_net::trace::TRACEPARENT)
                .and_then(|(_, v)| ferrule_net::trace::TraceContext::parse(v))
        };
        let trace = if !rated || !self.tracer.enabled() {
            None
        } else if let Some(parent) = incoming() {
            Some((parent.child(), Some(parent.span_id)))
        } else {
            self.tracer.start(upload.limits.trace_sampling).map(|c| (c, None))
        };
        let trace_start = match (&trace, upload.lookup_ns) {
            (Some(_), Some((start, _))) => start,
            (Some(_), None) => ferrule_net::trace::now_ns(),
            (None, _) => 0,
        };
        if let Some((context, _)) = &trace {
            if let Some(ApplicationProperties(app)) = message.application_properties.as_mut() {
                let value = SimpleValue::String(context.traceparent());
                app.insert(ferrule_net::trace::TRACEPARENT.into(), value);
            }
        }
        let outcome = self.broker.submit(&address, message, settled).outcome().await;
        if let Some((limit, size, now)) = volume.filter(|_| outcome != Outcome::Accepted) {
            self.volumes.refund(&upload.tenant, &limit, size, now);
        }
        // An at-most-once upload nobody took is fine for the device but must not count as
        // accepted in the metrics.
        let dropped = settled && outcome != Outcome::Accepted;
        let result = if report && settled && outcome == Outcome::Released {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            Err(UploadError::NoConsumer(address))
        } else {
            self.account(&address, settled, outcome)
        };
        record(&upload, &result, dropped, started.elapsed());
        if let Some((context, parent)) = trace {
            if let Some((start_ns, end_ns)) = upload.lookup_ns {
                self.tracer.record(ferrule_net::trace::Span {
                    name: "registry look-up",
                    kind: ferrule_net::trace::SpanKind::Server,
                    context: context.child(),
                    parent: Some(context.span_id),
                    start_ns,
                    end_ns,
                    attributes: vec![
                        ("tenant_id", upload.tenant.clone()),
                        ("device_id", upload.device_id.clone()),
                    ],
                    error: false,
                });
            }
            let mut span = upload_span(&upload, context, trace_start, &result);
            span.parent = parent;
            self.tracer.record(span);
        }
        result
    }

    fn account(&self, address: &str, settled: bool, outcome: Outcome) -> Result<(), UploadError> {
        match outcome {
            Outcome::Accepted => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            _ if settled => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Outcome::Released | Outcome::Modified { .. } => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(UploadError::NoConsumer(address.to_owned()))
            }
            Outcome::Rejected { condition: c, description } => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                if c == condition::RESOURCE_LIMIT_EXCEEDED {
                    Err(UploadError::Overloaded(description))
                } else {
                    Err(UploadError::Refused(description))
                }
            }
        }
    }
}

/// The span of one upload (its trace continues in the application through the message's
/// `traceparent`).
fn upload_span(
    upload: &Upload,
    context: ferrule_net::trace::TraceContext,
    start_ns: u64,
    result: &Result<(), UploadError>,
) -> ferrule_net::trace::Span {
    let mut attributes = vec![
        ("tenant_id", upload.tenant.clone()),
        ("device_id", upload.device_id.clone()),
        ("adapter", upload.orig_adapter.to_owned()),
        ("endpoint", upload.endpoint.as_str().to_owned()),
        ("qos", if upload.qos == Qos::AtLeastOnce { "1" } else { "0" }.to_owned()),
    ];
    if let Some(gateway) = &upload.gateway {
        attributes.push(("gateway_id", gateway.clone()));
    }
    if let Err(e) = result {
        attributes.push(("error", e.to_string()));
    }
    ferrule_net::trace::Span {
        name: match upload.endpoint {
            Endpoint::Telemetry => "upload telemetry",
            Endpoint::Event => "upload event",
        },
        kind: ferrule_net::trace::SpanKind::Server,
        context,
        parent: None,
        start_ns,
        end_ns: ferrule_net::trace::now_ns(),
        attributes,
        error: result.is_err(),
    }
}

/// Per-tenant message counters and latency histograms, by adapter, endpoint, QoS, outcome.
/// Outcomes: `accepted`, `dropped` (at most once, nobody took it), `no_consumer`,
/// `overloaded`, `refused`.
fn record(upload: &Upload, result: &Result<(), UploadError>, dropped: bool, elapsed: Duration) {
    let qos = if upload.qos == Qos::AtLeastOnce { "1" } else { "0" };
    let outcome = match result {
        Ok(()) if dropped => "dropped",
        Ok(()) => "accepted",
        Err(UploadError::NoConsumer(_)) => "no_consumer",
        Err(UploadError::Overloaded(_)) => "overloaded",
        Err(UploadError::RateLimited(_)) => "rate_limited",
        Err(UploadError::VolumeExceeded) => "volume_exceeded",
        Err(_) => "refused",
    };
    MESSAGE_METRICS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let key = (upload.orig_adapter, upload.endpoint.as_str(), qos, outcome);
        if let Some(counter) = cache.counters.get(&key).and_then(|m| m.get(upload.tenant.as_str()))
        {
            counter.increment(1);
        } else {
            if cache.counters.values().map(|m| m.len()).sum::<usize>() >= METRIC_HANDLES_MAX {
                cache.counters.clear();
            }
            let counter = metrics::counter!(
                "ferrule_adapter_messages_total",
                "adapter" => key.0,
                "tenant" => upload.tenant.clone(),
                "endpoint" => key.1,
                "qos" => key.2,
                "outcome" => key.3,
            );
            counter.increment(1);
            cache.counters.entry(key).or_default().insert(upload.tenant.as_str().into(), counter);
        }
        cache
            .histograms
            .entry(key)
            .or_insert_with(|| {
                metrics::histogram!(
                    "ferrule_adapter_message_duration_seconds",
                    "adapter" => key.0,
                    "endpoint" => key.1,
                    "qos" => key.2,
                    "outcome" => key.3,
                )
            })
            .record(elapsed.as_secs_f64());
    });
}

/// (adapter, endpoint, qos, outcome) of a message metric.
type MetricKey = (&'static str, &'static str, &'static str, &'static str);

/// Bound on cached counter handles per thread (one per tenant and label set); past it the
/// cache starts over (a miss costs one registry look-up in the recorder).
const METRIC_HANDLES_MAX: usize = 4096;

/// Metric handles of this thread: a message costs a hash look-up and an atomic add instead
/// of the recorder's label hashing, its lock and a tenant string per message.
#[derive(Default)]
struct MessageMetrics {
    counters:
        std::collections::HashMap<MetricKey, std::collections::HashMap<Box<str>, metrics::Counter>>,
    histograms: std::collections::HashMap<MetricKey, metrics::Histogram>,
}

thread_local! {
    static MESSAGE_METRICS: std::cell::RefCell<MessageMetrics> = Default::default();
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

/// Builds the Hono downstream message for `upload` sent to `address`.
pub fn to_message(address: &str, upload: &Upload) -> Message {
    let mut message = data_message(upload.payload.to_vec());
    let durable = upload.endpoint == Endpoint::Event;
    message.header = Some(Header {
        durable,
        ttl: upload.ttl.map(|t| t.as_millis().min(u32::MAX as u128) as u32),
        ..Default::default()
    });
    message.properties = Some(Properties {
        to: Some(address.to_owned()),
        content_type: upload.content_type.as_deref().map(Symbol::from),
        creation_time: Some(Timestamp::from_milliseconds(now_millis() as i64)),
        ..Default::default()
    });
    // Sized up front: growing the maps was 2 % of the QoS 0 CPU (device_id, qos,
    // orig_adapter, orig_address, and room for ttd and traceparent).
    let mut app: OrderedMap<String, SimpleValue> =
        OrderedMap::with_capacity(upload.properties.len() + 6);
    for (k, v) in &upload.properties {
        app.insert(k.clone(), SimpleValue::String(v.clone()));
    }
    app.insert("device_id".into(), SimpleValue::String(upload.device_id.clone()));
    app.insert("qos".into(), SimpleValue::Int(if upload.qos == Qos::AtLeastOnce { 1 } else { 0 }));
    app.insert("orig_adapter".into(), SimpleValue::String(upload.orig_adapter.into()));
    app.insert("orig_address".into(), SimpleValue::String(upload.orig_address.clone()));
    message.application_properties = Some(ApplicationProperties(app));
    let mut annotations = OrderedMap::with_capacity(3);
    annotations.insert(Symbol::from("tenant_id").into(), string(&upload.tenant));
    annotations.insert(Symbol::from("device_id").into(), string(&upload.device_id));
    if let Some(ttd) = upload.ttd {
        let secs = i32::try_from(ttd.as_secs()).unwrap_or(i32::MAX);
        if let Some(ApplicationProperties(app)) = message.application_properties.as_mut() {
            app.insert("ttd".into(), SimpleValue::Int(secs));
        }
    }
    if upload.retain {
        annotations.insert(Symbol::from("x-opt-retain").into(), Value::Bool(true));
    }
    message.message_annotations = Some(MessageAnnotations(annotations));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload() -> Upload {
        Upload {
            tenant: "t1".into(),
            device_id: "d1".into(),
            endpoint: Endpoint::Event,
            qos: Qos::AtLeastOnce,
            payload: Bytes::from_static(b"{\"temp\":5}"),
            content_type: Some("application/json".into()),
            ttl: Some(Duration::from_secs(30)),
            orig_adapter: "hono-mqtt",
            orig_address: "event".into(),
            properties: vec![("foo".into(), "bar".into())],
            limits: TenantLimits::default(),
            retain: false,
            defaults: None,
            ttd: None,
            gateway: None,
            lookup_ns: None,
        }
    }

    #[test]
    fn hono_downstream_format() {
        let m = to_message("event/t1", &upload());
        let header = m.header.as_ref().unwrap();
        assert!(header.durable);
        assert_eq!(header.ttl, Some(30_000));
        let props = m.properties.as_ref().unwrap();
        assert_eq!(props.to.as_deref(), Some("event/t1"));
        assert_eq!(props.content_type.as_ref().map(|s| s.as_str()), Some("application/json"));
        assert!(props.creation_time.is_some());
        let app = &m.application_properties.as_ref().unwrap().0;
        assert_eq!(app.get("device_id"), Some(&SimpleValue::String("d1".into())));
        assert_eq!(app.get("qos"), Some(&SimpleValue::Int(1)));
        assert_eq!(app.get("orig_adapter"), Some(&SimpleValue::String("hono-mqtt".into())));
        assert_eq!(app.get("foo"), Some(&SimpleValue::String("bar".into())));
    }

    #[test]
    fn shared_rules() {
        assert_eq!(Downstream::validate(b"", None, 10), Err(UploadError::EmptyWithoutContentType));
        assert!(Downstream::validate(b"", Some(EMPTY_NOTIFICATION), 10).is_ok());
        assert_eq!(
            Downstream::validate(&[0; 11], None, 10),
            Err(UploadError::TooLarge { size: 11, max: 10 })
        );
    }

    #[tokio::test]
    async fn no_consumer_is_an_error_only_when_acknowledged() {
        let downstream = Downstream::new(Broker::in_memory(&Default::default()));
        let mut u = upload();
        u.endpoint = Endpoint::Telemetry;
        assert!(matches!(downstream.send(u.clone()).await, Err(UploadError::NoConsumer(_))));
        u.qos = Qos::AtMostOnce;
        assert_eq!(downstream.send(u).await, Ok(()));
        assert_eq!(downstream.stats.dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn tenant_defaults_and_max_ttl() {
        let defaults = MessageDefaults {
            ttl: Some(Duration::from_secs(60)),
            content_type: Some("application/x-default".into()),
            properties: vec![("site".into(), "p7".into()), ("foo".into(), "default".into())],
        };
        let mut u = upload(); // an event with ttl 30 s, content type, property foo=bar
        u.defaults = Some(Arc::new(defaults.clone()));
        u.limits.max_ttl = Some(10);
        u.apply_tenant_terms();
        assert_eq!(u.ttl, Some(Duration::from_secs(10)), "cut to max-ttl");
        assert_eq!(u.content_type.as_deref(), Some("application/json"), "the device's wins");
        assert!(u.properties.contains(&("foo".into(), "bar".into())));
        assert!(u.properties.contains(&("site".into(), "p7".into())));
        assert_eq!(u.properties.len(), 2);
        let mut bare = upload();
        (bare.ttl, bare.content_type, bare.properties) = (None, None, Vec::new());
        bare.endpoint = Endpoint::Telemetry;
        bare.defaults = Some(Arc::new(defaults));
        bare.apply_tenant_terms();
        assert_eq!(bare.ttl, Some(Duration::from_secs(60)), "the default, no max for telemetry");
        assert_eq!(bare.content_type.as_deref(), Some("application/x-default"));
        bare.limits.max_ttl_telemetry_qos1 = Some(5);
        bare.apply_tenant_terms();
        assert_eq!(bare.ttl, Some(Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn the_data_volume_counts_taken_messages_only() {
        let downstream = Downstream::new(Broker::in_memory(&Default::default()));
        let limit = crate::quota::UsageLimit { effective_since: 0, max: 25, period_days: None };
        let mut u = upload(); // a 10-byte event
        u.limits.data_volume = Some(limit);
        assert_eq!(downstream.send(u.clone()).await, Ok(()));
        let mut unconsumed = u.clone();
        unconsumed.endpoint = Endpoint::Telemetry;
        assert!(matches!(downstream.send(unconsumed).await, Err(UploadError::NoConsumer(_))));
        assert_eq!(downstream.send(u.clone()).await, Ok(()), "the refused one was given back");
        assert_eq!(downstream.send(u.clone()).await, Err(UploadError::VolumeExceeded));
        let mut connection_event = u.clone();
        connection_event.limits.data_volume = Some(limit);
        assert_eq!(downstream.send_notification(connection_event).await, Ok(()), "not counted");
        u.tenant = "t2".into();
        assert_eq!(downstream.send(u).await, Ok(()), "another tenant's volume");
    }
}
