//! Distributed tracing, kept small: W3C trace context (`traceparent`) carried in AMQP
//! application properties as Hono 2.5+ does, spans recorded into a bounded channel and
//! exported as OTLP/HTTP JSON by the platform (off unless an endpoint is configured).
//! A full span never blocks a message: when the exporter falls behind, spans are dropped
//! and counted (`ferrule_trace_spans_dropped_total`).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

/// The application property that carries the trace context (W3C Trace Context, as Hono).
pub const TRACEPARENT: &str = "traceparent";

/// A position in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let chunk = uuid::Uuid::new_v4().into_bytes();
        let n = (N - filled).min(chunk.len());
        out[filled..filled + n].copy_from_slice(&chunk[..n]);
        filled += n;
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// A new trace.
    pub fn root(sampled: bool) -> Self {
        Self { trace_id: random_bytes(), span_id: random_bytes(), sampled }
    }

    /// A new span in the same trace.
    pub fn child(&self) -> Self {
        Self { span_id: random_bytes(), ..*self }
    }

    /// Parses a `traceparent` value (version 00); `None` if malformed or all-zero ids.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = unhex(trace)?;
        let span_id: [u8; 8] = unhex(span)?;
        let flags: [u8; 1] = unhex(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, span_id, sampled: flags[0] & 1 == 1 })
    }

    /// The `traceparent` value for this position.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.span_id), u8::from(self.sampled))
    }

    /// The trace id as lowercase hex.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// The kind of a span (OTLP's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Server = 2,
    Producer = 4,
    Consumer = 5,
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: &'static str,
    pub kind: SpanKind,
    pub context: TraceContext,
    pub parent: Option<[u8; 8]>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, String)>,
    pub error: bool,
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// How a tenant wants its devices' messages traced (its registry `tracing` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampling {
    /// The platform's `sample_ratio` (or what an incoming trace context says).
    #[default]
    Default,
    All,
    None,
}

/// Where spans go. Cheap to clone; a disabled tracer records nothing and costs a branch.
#[derive(Debug, Clone, Default)]
pub struct Tracer {
    spans: Option<mpsc::Sender<Span>>,
    ratio: f64,
}

/// Spans waiting for the exporter at most.
pub const SPAN_QUEUE: usize = 4096;

impl Tracer {
    /// A tracer that records nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A tracer sampling `ratio` of new traces, and its exporter's end of the channel.
    pub fn new(ratio: f64) -> (Self, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(SPAN_QUEUE);
        (Self { spans: Some(tx), ratio: ratio.clamp(0.0, 1.0) }, rx)
    }

    pub fn enabled(&self) -> bool {
        self.spans.is_some()
    }

    /// The context of a new trace for a tenant with `sampling` (`None` when disabled).
    pub fn start(&self, sampling: Sampling) -> Option<TraceContext> {
        self.spans.as_ref()?;
        let sampled = match sampling {
            Sampling::All => true,
            Sampling::None => false,
            Sampling::Default => {
                self.ratio >= 1.0
                    || (self.ratio > 0.0
                        && f64::from(u32::from_le_bytes(random_bytes())) / f64::from(u32::MAX)
                            < self.ratio)
            }
        };
        Some(TraceContext::root(sampled))
    }

    /// Records `span` if its trace is sampled (dropped, and counted, if the exporter is
    /// behind).
    pub fn record(&self, span: Span) {
        let Some(tx) = &self.spans else { return };
        if !span.context.sampled {
            return;
        }
        if tx.try_send(span).is_err() {
            metrics::counter!("ferrule_trace_spans_dropped_total").increment(1);
        }
    }
}

/// Spans as an OTLP/HTTP JSON `ExportTraceServiceRequest`.
pub fn otlp_json(service: &str, spans: &[Span]) -> String {
    let string = |s: &str| {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    };
    let mut body = String::new();
    let _ = write!(
        body,
        r#"{{"resourceSpans":[{{"resource":{{"attributes":[{{"key":"service.name","value":{{"stringValue":{}}}}}]}},"scopeSpans":[{{"scope":{{"name":"ferrule"}},"spans":["#,
        string(service)
    );
    for (i, span) in spans.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let _ = write!(
            body,
            r#"{{"traceId":"{}","spanId":"{}","#,
            hex(&span.context.trace_id),
            hex(&span.context.span_id)
        );
        if let Some(parent) = span.parent {
            let _ = write!(body, r#""parentSpanId":"{}","#, hex(&parent));
        }
        let _ = write!(
            body,
            r#""name":{},"kind":{},"startTimeUnixNano":"{}","endTimeUnixNano":"{}","attributes":["#,
            string(span.name),
            span.kind as u8,
            span.start_ns,
            span.end_ns
        );
        for (j, (key, value)) in span.attributes.iter().enumerate() {
            if j > 0 {
                body.push(',');
            }
            let _ = write!(
                body,
                r#"{{"key":{},"value":{{"stringValue":{}}}}}"#,
                string(key),
                string(value)
            );
        }
        let _ = write!(body, r#"],"status":{{"code":{}}}}}"#, if span.error { 2 } else { 1 });
    }
    body.push_str("]}]}]}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(text).expect("valid");
        assert!(ctx.sampled);
        assert_eq!(ctx.traceparent(), text);
        assert_eq!(ctx.child().trace_id, ctx.trace_id);
        assert_ne!(ctx.child().span_id, ctx.span_id);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn sampling_and_json() {
        let (tracer, mut rx) = Tracer::new(0.0);
        let unsampled = tracer.start(Sampling::Default).expect("enabled");
        assert!(!unsampled.sampled);
        let sampled = tracer.start(Sampling::All).expect("enabled");
        assert!(sampled.sampled);
        for context in [unsampled, sampled] {
            tracer.record(Span {
                name: "upload",
                kind: SpanKind::Server,
                context,
                parent: None,
                start_ns: 1,
                end_ns: 2,
                attributes: vec![("tenant_id", "t\"1".into())],
                error: false,
            });
        }
        let span = rx.try_recv().expect("the sampled one");
        assert!(rx.try_recv().is_err(), "the other was not recorded");
        let json = otlp_json("ferrule", &[span]);
        assert!(json.contains(&sampled.trace_id_hex()) && json.contains(r#""t\"1""#), "{json}");
        assert!(Tracer::disabled().start(Sampling::All).is_none());
    }
}
