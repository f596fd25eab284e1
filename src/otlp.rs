//! The OTLP exporter: spans from [`ferrule_net::trace::Tracer`], POSTed in batches as
//! OTLP/HTTP JSON to `ENDPOINT/v1/traces` (at most 512 per request, at least once a
//! second while there are any). A receiver that is down loses the batch (logged, counted
//! in `ferrule_trace_export_failures_total`); nothing waits for it.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use ferrule_net::trace::{otlp_json, Span};

/// Spans per request at most.
const BATCH: usize = 512;

/// Where spans go: `http://HOST:PORT[/PATH]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub authority: String,
    pub path: String,
}

impl Endpoint {
    /// Parses a plain-HTTP base URL; `None` for anything else.
    pub fn parse(url: &str) -> Option<Self> {
        let rest = url.strip_prefix("http://")?;
        let (authority, base) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let authority =
            if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        Some(Self { authority, path: format!("{base}/v1/traces") })
    }
}

/// Exports spans from `spans` until `stop` (then what is queued goes out once more).
pub async fn export(
    endpoint: Endpoint,
    service: String,
    mut spans: mpsc::Receiver<Span>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stopping = tokio::select! {
            span = spans.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() < BATCH {
                        continue;
                    }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        if stopping {
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
            }
        }
        if !batch.is_empty() {
            let body = otlp_json(&service, &batch);
            if let Err(e) = post(&endpoint, body).await {
                metrics::counter!("ferrule_trace_export_failures_total").increment(1);
                tracing::warn!(error = %e, spans = batch.len(), "OTLP export failed; spans dropped");
            }
            batch.clear();
        }
        if stopping {
            return;
        }
    }
}

async fn post(endpoint: &Endpoint, body: String) -> anyhow::Result<()> {
    let connect = tokio::net::TcpStream::connect(&endpoint.authority);
    let stream = tokio::time::timeout(Duration::from_secs(5), connect).await??;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::post(endpoint.path.as_str())
        .header(hyper::header::HOST, endpoint.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response =
        tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await??;
    anyhow::ensure!(response.status().is_success(), "receiver answered {}", response.status());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://collector:4318").unwrap();
        assert_eq!((e.authority.as_str(), e.path.as_str()), ("collector:4318", "/v1/traces"));
        let e = Endpoint::parse("http://127.0.0.1:9/otel/").unwrap();
        assert_eq!(e.path, "/otel/v1/traces");
        assert_eq!(Endpoint::parse("http://host").unwrap().authority, "host:80");
        for bad in ["https://c:4318", "c:4318", "http://", "http://u@c:1"] {
            assert_eq!(Endpoint::parse(bad), None, "{bad}");
        }
    }
}
