//! Admission of TCP connections, shared by every listener (AMQP, HTTP adapter,
//! management API, ops): a cap on open connections, and per source address a cap on
//! open connections and a token bucket on new ones, all checked before a peer has said
//! anything. [`serve`] is the accept loop that applies them.
//!
//! Source addresses are counted per IPv4 address and per IPv6 /64 (one host usually has
//! a whole /64). The per-address table is bounded: idle entries are swept, and a peer
//! arriving while it is full of busy addresses is refused (`reason="table_full"`).
//! Every refusal is counted in `ferrule_connections_refused_total{listener, reason}`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Per-source limits of one listener (`max_connections_per_ip`, `connection_rate_per_ip`,
/// `connection_burst_per_ip` in each listener's config section).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceLimits {
    /// Open connections from one source address.
    pub max_per_source: usize,
    /// New connections per second from one source address, on average...
    pub rate_per_second: f64,
    /// ... and in a burst.
    pub burst: u32,
}

impl SourceLimits {
    /// Generous enough for many devices behind one NAT, tight enough that one host
    /// cannot fill a listener or churn connections at wire speed.
    pub const DEFAULT: SourceLimits =
        SourceLimits { max_per_source: 1000, rate_per_second: 100.0, burst: 200 };

    /// Checks the values, as the `max_connections_per_ip`, `connection_rate_per_ip` and
    /// `connection_burst_per_ip` keys of `section`.
    ///
    /// # Errors
    /// The first bad key.
    pub fn validate(&self, section: &str) -> Result<(), crate::ConfigError> {
        let bad = |key, problem| Err(crate::ConfigError::new(section, key, problem));
        if self.max_per_source == 0 {
            return bad("max_connections_per_ip", "must be at least 1");
        }
        if !(self.rate_per_second > 0.0 && self.rate_per_second.is_finite()) {
            return bad("connection_rate_per_ip", "must be a positive number");
        }
        if self.burst == 0 {
            return bad("connection_burst_per_ip", "must be at least 1");
        }
        Ok(())
    }
}

/// Most source addresses tracked at once per listener.
const MAX_TRACKED_SOURCES: usize = 100_000;
/// Pause after a failed `accept` (typically EMFILE), instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerSource,
    Rate,
    TableFull,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerSource => "connections_per_ip",
            Refusal::Rate => "connection_rate",
            Refusal::TableFull => "table_full",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(u32),
    V6Prefix(u64),
}

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.into()),
                None => SourceKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug)]
struct Source {
    open: usize,
    tokens: f64,
    refilled: Instant,
}

/// The admission state of one listener.
#[derive(Debug)]
pub struct Admission {
    listener: &'static str,
    limits: SourceLimits,
    total: Arc<Semaphore>,
    sources: Mutex<HashMap<SourceKey, Source>>,
}

/// An admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    key: SourceKey,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut sources = self.admission.lock();
        if let Some(source) = sources.get_mut(&self.key) {
            source.open = source.open.saturating_sub(1);
        }
    }
}

impl Admission {
    /// `max_connections` open at once on this listener; `limits` per source.
    pub fn new(listener: &'static str, max_connections: usize, limits: SourceLimits) -> Arc<Self> {
        Arc::new(Self {
            listener,
            limits,
            total: Arc::new(Semaphore::new(max_connections.max(1))),
            sources: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SourceKey, Source>> {
        self.sources.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits a connection from `ip` holding `permit` (a place under the listener's cap).
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        permit: OwnedSemaphorePermit,
        now: Instant,
    ) -> Result<Admitted, Refusal> {
        self.admit_inner(ip, Some(permit), now)
    }

    /// Admits a connection from `ip` by the per-source limits only, for a listener whose
    /// total is capped elsewhere (MQTT: ntex's accept loop). Counts a refusal.
    pub fn admit_source(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let admitted = self.admit_inner(ip, None, Instant::now());
        if let Err(refusal) = &admitted {
            metrics::counter!(
                "ferrule_connections_refused_total",
                "listener" => self.listener,
                "reason" => refusal.as_str()
            )
            .increment(1);
        }
        admitted
    }

    fn admit_inner(
        self: &Arc<Self>,
        ip: IpAddr,
        permit: Option<OwnedSemaphorePermit>,
        now: Instant,
    ) -> Result<Admitted, Refusal> {
        let key = SourceKey::from(ip);
        let limits = self.limits;
        let mut sources = self.lock();
        if !sources.contains_key(&key) && sources.len() >= MAX_TRACKED_SOURCES {
            // Forget sources with nothing open whose bucket has refilled.
            let full = limits.burst as f64;
            sources.retain(|_, s| {
                s.open > 0
                    || s.tokens
                        + now.duration_since(s.refilled).as_secs_f64() * limits.rate_per_second
                        < full
            });
            if sources.len() >= MAX_TRACKED_SOURCES {
                return Err(Refusal::TableFull);
            }
        }
        let source = sources.entry(key).or_insert(Source {
            open: 0,
            tokens: limits.burst as f64,
            refilled: now,
        });
        let elapsed = now.saturating_duration_since(source.refilled).as_secs_f64();
        source.tokens = (source.tokens + elapsed * limits.rate_per_second).min(limits.burst as f64);
        source.refilled = now;
        if source.open >= limits.max_per_source {
            return Err(Refusal::PerSource);
        }
        if source.tokens < 1.0 {
            return Err(Refusal::Rate);
        }
        source.tokens -= 1.0;
        source.open += 1;
        drop(sources);
        Ok(Admitted { admission: self.clone(), key, _permit: permit })
    }

    /// Connections open now (for tests and metrics).
    pub fn open(&self) -> usize {
        self.lock().values().map(|s| s.open).sum()
    }
}

/// Accepts connections until `shutdown` and runs `handle` for each admitted one on
/// `tasks`, holding its place until `handle` returns. Over `max_connections`, new
/// peers wait in the kernel's backlog (no memory here); refused peers are closed at
/// once. Sets TCP_NODELAY.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = admission.total.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(listener = admission.listener, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        match admission.admit(peer.ip(), permit, Instant::now()) {
            Ok(admitted) => {
                let _ = stream.set_nodelay(true);
                let connection = handle(stream, peer);
                tasks.spawn(async move {
                    connection.await;
                    drop(admitted);
                });
            }
            Err(refusal) => {
                metrics::counter!(
                    "ferrule_connections_refused_total",
                    "listener" => admission.listener,
                    "reason" => refusal.as_str()
                )
                .increment(1);
                tracing::debug!(listener = admission.listener, %peer, reason = refusal.as_str(), "connection refused");
            }
        }
    }
}

/// A listener's sockets: the plain one, and the TLS one with its acceptor when TLS is
/// configured.
pub struct Listeners {
    pub plain: TcpListener,
    pub tls: Option<(TcpListener, crate::tls::TlsAcceptor)>,
}

/// A listen address that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

impl Listeners {
    /// Binds `plain`, and the TLS address when `tls` is given.
    ///
    /// # Errors
    /// The first address that cannot be bound.
    pub async fn bind(
        plain: SocketAddr,
        tls: Option<(SocketAddr, crate::tls::TlsAcceptor)>,
    ) -> Result<Self, BindError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })
        };
        let plain = bind(plain).await?;
        let tls = match tls {
            Some((addr, acceptor)) => Some((bind(addr).await?, acceptor)),
            None => None,
        };
        Ok(Self { plain, tls })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.plain.local_addr().expect("bound socket has an address")
    }

    /// The TLS listener's address, if TLS is configured.
    pub fn local_tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(l, _)| l.local_addr().expect("bound socket has an address"))
    }
}

/// A connection as its handler gets it: plain TCP, or TLS once the handshake passed.
pub type Connection =
    tokio_util::either::Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// The TCP socket under a [`Connection`].
pub fn tcp(connection: &Connection) -> &TcpStream {
    match connection {
        tokio_util::either::Either::Left(tcp) => tcp,
        tokio_util::either::Either::Right(tls) => tls.get_ref().0,
    }
}

/// [`serve`] for a listener that speaks TLS when `tls` is set: `handle` gets each
/// connection once its handshake passed (a failed or slow one is logged and closed, see
/// [`crate::tls::handshake`]).
pub async fn serve_maybe_tls<F, Fut>(
    listener: TcpListener,
    tls: Option<crate::tls::TlsAcceptor>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    handle: F,
) where
    F: Fn(Connection, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve(listener, admission, shutdown, tasks, move |stream, peer| {
        let (tls, handle) = (tls.clone(), handle.clone());
        async move {
            let connection = match tls {
                None => tokio_util::either::Either::Left(stream),
                Some(acceptor) => match crate::tls::handshake(&acceptor, stream, peer).await {
                    Some(stream) => tokio_util::either::Either::Right(stream),
                    None => return,
                },
            };
            handle(connection, peer).await;
        }
    })
    .await;
}

/// Counts a connection that did not authenticate in time (`reason="pre_auth_timeout"`).
pub fn count_pre_auth_timeout(listener: &'static str) {
    metrics::counter!("ferrule_connections_refused_total", "listener" => listener, "reason" => "pre_auth_timeout")
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permit(admission: &Admission) -> OwnedSemaphorePermit {
        admission.total.clone().try_acquire_owned().expect("a place")
    }

    #[test]
    fn per_source_caps_and_rates() {
        let limits = SourceLimits { max_per_source: 2, rate_per_second: 1.0, burst: 3 };
        let admission = Admission::new("test", 100, limits);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let first = admission.admit(a, permit(&admission), t0).expect("admitted");
        let second = admission.admit(a, permit(&admission), t0).expect("admitted");
        assert_eq!(admission.admit(a, permit(&admission), t0).unwrap_err(), Refusal::PerSource);
        // Another source is not affected.
        let other = admission.admit(b, permit(&admission), t0).expect("admitted");
        drop((first, second));
        // One token left of the burst of three, then the rate: one a second.
        let third = admission.admit(a, permit(&admission), t0).expect("admitted");
        drop(third);
        assert_eq!(admission.admit(a, permit(&admission), t0).unwrap_err(), Refusal::Rate);
        let later = t0 + Duration::from_millis(1100);
        assert!(admission.admit(a, permit(&admission), later).is_ok());
        drop(other);
        assert_eq!(admission.open(), 0);
    }

    #[test]
    fn ipv6_hosts_count_per_prefix() {
        let limits = SourceLimits { max_per_source: 1, ..SourceLimits::DEFAULT };
        let admission = Admission::new("test", 100, limits);
        let now = Instant::now();
        let _held =
            admission.admit("2001:db8::1".parse().unwrap(), permit(&admission), now).unwrap();
        let same_host =
            admission.admit("2001:db8::ffff:1".parse().unwrap(), permit(&admission), now);
        assert_eq!(same_host.unwrap_err(), Refusal::PerSource);
        assert!(admission
            .admit("2001:db8:0:1::1".parse().unwrap(), permit(&admission), now)
            .is_ok());
        // IPv4-mapped addresses count as their IPv4 address.
        let _v4 = admission.admit("192.0.2.1".parse().unwrap(), permit(&admission), now).unwrap();
        assert_eq!(
            admission
                .admit("::ffff:192.0.2.1".parse().unwrap(), permit(&admission), now)
                .unwrap_err(),
            Refusal::PerSource
        );
    }

    #[tokio::test]
    async fn serve_closes_refused_peers_and_frees_places() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = SourceLimits { max_per_source: 1, ..SourceLimits::DEFAULT };
        let admission = Admission::new("test", 10, limits);
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (release, released) = tokio::sync::watch::channel(false);
        tokio::spawn(serve(
            listener,
            admission.clone(),
            shutdown.clone(),
            tasks.clone(),
            move |_stream, _peer| {
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                }
            },
        ));
        use tokio::io::AsyncReadExt;
        let _held = TcpStream::connect(addr).await.unwrap();
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), refused.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "the second connection from one source is closed");
        release.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while admission.open() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("places freed");
        shutdown.cancel();
    }
}
