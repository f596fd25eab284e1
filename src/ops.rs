//! The operations endpoint (`[ops] listen`, default port 8088): Prometheus `/metrics`
//! and the health probes `/health/live` and `/health/ready`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use ferrule_messaging::Broker;

/// `[ops]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Address of the metrics and health endpoint: loopback by default (metrics name
    /// every tenant and address); open it to the pod network or a scraper on purpose.
    pub listen: SocketAddr,
    /// Most connections open at once (a scraper and the probes need a handful).
    pub max_connections: usize,
    /// Closes connections whose request headers take longer than this.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

impl OpsConfig {
    /// Checks the values serde cannot check.
    ///
    /// # Errors
    /// The first bad key.
    pub fn validate(&self) -> Result<(), ferrule_net::ConfigError> {
        let bad =
            |key: &str, problem: &str| Err(ferrule_net::ConfigError::new("ops", key, problem));
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if self.header_read_timeout.is_zero() {
            return bad("header_read_timeout", "must not be zero");
        }
        Ok(())
    }
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8088".parse().expect("valid"),
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

pub const DEFAULT_TOML: &str = r#"[ops]
# Address of the metrics (/metrics) and health (/health/live, /health/ready) endpoint.
# Loopback by default: metrics name every tenant and address. In a container or on
# Kubernetes set "0.0.0.0:8088" (probes and scrapers come from outside the process's host).
listen = "127.0.0.1:8088"
# Most connections open at once (a scraper and the probes need a handful).
max_connections = 64
# Closes connections whose request headers take longer than this.
header_read_timeout = "10s"

"#;

/// Installs the process-wide Prometheus recorder on first use, before components start;
/// later calls (several platforms in one process, as in tests) share it.
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5])?
        .install_recorder()?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// A dependency readiness waits for: `None` while it is fine, else why not.
pub type ReadinessCheck = Arc<dyn Fn() -> Option<&'static str> + Send + Sync>;

/// Whether the platform is ready: set once every listener is bound, cleared on shutdown;
/// and every dependency added with [`Readiness::require`] fine (cluster mode: the shared
/// broker reachable).
#[derive(Clone, Default)]
pub struct Readiness {
    serving: Arc<AtomicBool>,
    checks: Arc<std::sync::Mutex<Vec<ReadinessCheck>>>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.serving.store(ready, Ordering::Release);
    }

    /// Readiness also waits for `check`.
    pub fn require(&self, check: ReadinessCheck) {
        self.checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(check);
    }

    /// Why the platform is not ready, if it is not.
    fn blocked(&self) -> Option<&'static str> {
        if !self.serving.load(Ordering::Acquire) {
            return Some("not serving");
        }
        let checks = self.checks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        checks.iter().find_map(|check| check())
    }
}

struct State {
    metrics: PrometheusHandle,
    ready: Readiness,
    broker: Broker,
}

pub async fn bind(config: &OpsConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (ops.listen): {e}", config.listen))
}

pub async fn run(
    listener: TcpListener,
    config: OpsConfig,
    metrics: PrometheusHandle,
    ready: Readiness,
    broker: Broker,
    shutdown: CancellationToken,
) {
    let state = Arc::new(State { metrics, ready, broker });
    // One scraper and a few probes: one connection per source is plenty, but a probe
    // and a scraper may share a host; the rate stops a request flood from one host.
    let limits = ferrule_net::listener::SourceLimits {
        max_per_source: 16,
        rate_per_second: 20.0,
        burst: 40,
    };
    let admission = ferrule_net::listener::Admission::new("ops", config.max_connections, limits);
    let header_timeout = config.header_read_timeout;
    let tasks = tokio_util::task::TaskTracker::new();
    ferrule_net::listener::serve(
        listener,
        admission,
        shutdown,
        tasks.clone(),
        move |stream, _peer| {
            let state = state.clone();
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        },
    )
    .await;
    tasks.close();
}

/// How long durable storage may fail (the store reopening, the disk filling up) before
/// liveness fails.
const STORAGE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

async fn handle(state: &State, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/metrics") => {
            state.broker.publish_gauges();
            (StatusCode::OK, "text/plain; version=0.0.4", state.metrics.render())
        }
        // Live unless durable storage has failed for longer than the store takes to
        // reopen itself: then only a restart (or an operator) can help.
        ("GET", "/health/live") => match state.broker.storage_failing_for() {
            Some(failing) if failing > STORAGE_GRACE => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("storage failing for {}s\n", failing.as_secs()),
            ),
            _ => (StatusCode::OK, "text/plain", "live\n".into()),
        },
        ("GET", "/health/ready") => {
            // The store's health as the writer last saw it: a probe never forces a disk
            // flush (an unauthenticated probe loop would otherwise run fsyncs); the
            // dependencies' as their own checks last saw it.
            let storage = (!state.broker.storage_healthy()).then_some("storage unavailable");
            match state.ready.blocked().or(storage) {
                None => (StatusCode::OK, "text/plain", "ready\n".into()),
                Some(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
            }
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}
