//! Start-up and lifecycle: open the store, build the services, serve the API until the
//! shutdown token is cancelled, then drain connections.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, ApiState};
use crate::auth::{AuthService, AuthSettings};
use crate::config::{ConfigError, RegistryConfig, StorageKind};
use crate::management::{HashPool, Management};
use crate::store::{EmbeddedStore, RedisStore, RegistryStore, StoreError};
use crate::verifiers::Verifiers;

/// How long shutdown waits for in-flight requests.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Slow clients get this long to send request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the registry could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened.
    #[error("opening the registry store: {0}")]
    Store(#[from] StoreError),
    /// The API address could not be bound.
    #[error("binding the management API to {addr}: {source}")]
    Bind {
        /// Configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or key is unusable.
    #[error("registry.tls: {0}")]
    Tls(String),
    /// The password verifiers' key is unusable.
    #[error("registry.{0}")]
    Verifiers(#[from] crate::verifiers::VerifierError),
}

/// Opens the configured store.
///
/// # Errors
/// [`StoreError`] if the file or server is unusable.
pub async fn open_store(
    config: &RegistryConfig,
    data_dir: &Path,
) -> Result<Arc<dyn RegistryStore>, StoreError> {
    Ok(match config.storage {
        StorageKind::Embedded => {
            let path = data_dir.join(&config.embedded_file);
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
                .await
                .map_err(|e| StoreError::Backend(e.to_string()))??;
            Arc::new(store)
        }
        StorageKind::Redis => {
            let tls = crate::RedisTls::from_ca_file(config.redis_tls_ca_file.as_deref())
                .map_err(|e| StoreError::Backend(format!("redis_tls_ca_file: {e}")))?;
            let prefix = &config.redis_key_prefix;
            if config.redis_cluster_nodes.is_empty() {
                Arc::new(RedisStore::connect_tls(&config.redis_url, prefix, &tls).await?)
            } else {
                let nodes = &config.redis_cluster_nodes;
                Arc::new(RedisStore::connect_cluster_tls(nodes, prefix, &tls).await?)
            }
        }
    })
}

/// The password verifiers `verifier_key_file` asks for (`None`: off).
///
/// # Errors
/// An unusable key file.
fn open_verifiers(
    config: &RegistryConfig,
    data_dir: &Path,
) -> Result<Option<Arc<Verifiers>>, RegistryError> {
    let Some(key_file) = &config.verifier_key_file else { return Ok(None) };
    let path = data_dir.join(&config.verifier_file);
    let max = config.cache_max_entries;
    Ok(Some(Arc::new(Verifiers::open(key_file, data_dir, path, max)?)))
}

/// How often new verifiers are written out.
const VERIFIER_WRITE_INTERVAL: Duration = Duration::from_secs(5);

/// Writes new verifiers every [`VERIFIER_WRITE_INTERVAL`] and once more at shutdown
/// ([`Registry::stopped`] waits for it).
fn spawn_verifier_writer(
    tracker: &TaskTracker,
    verifiers: Option<Arc<Verifiers>>,
    shutdown: CancellationToken,
) {
    let Some(verifiers) = verifiers else { return };
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(VERIFIER_WRITE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.cancelled() => true,
            };
            let v = verifiers.clone();
            match tokio::task::spawn_blocking(move || v.persist()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "password verifiers not written"),
                Err(e) => tracing::warn!(error = %e, "password verifiers not written"),
            }
            if last {
                return;
            }
        }
    });
}

/// A running registry.
pub struct Registry {
    /// `None` when the API is off (an instance without the management role).
    local_addr: Option<SocketAddr>,
    auth: AuthService,
    management: Management,
    pool: HashPool,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl Registry {
    /// Validates `config`, opens the store, binds the API and starts serving. The API
    /// stops when `shutdown` is cancelled; await [`Registry::stopped`] to wait for the drain.
    ///
    /// # Errors
    /// [`RegistryError`] for bad config, an unusable store or a failed bind.
    pub async fn start(
        config: &RegistryConfig,
        data_dir: &Path,
        shutdown: CancellationToken,
    ) -> Result<Self, RegistryError> {
        config.validate()?;
        let verifiers = open_verifiers(config, data_dir)?;
        let store = open_store(config, data_dir).await?;
        Self::start_inner(config, store, shutdown, None, verifiers).await
    }

    /// [`Registry::start`], serving devices' connection state from `states`.
    ///
    /// # Errors
    /// [`RegistryError`] for bad config, an unusable store or a failed bind.
    pub async fn start_tracking(
        config: &RegistryConfig,
        data_dir: &Path,
        shutdown: CancellationToken,
        states: Arc<dyn crate::api::DeviceStates>,
    ) -> Result<Self, RegistryError> {
        config.validate()?;
        let verifiers = open_verifiers(config, data_dir)?;
        let store = open_store(config, data_dir).await?;
        Self::start_inner(config, store, shutdown, Some(states), verifiers).await
    }

    /// [`Registry::start_tracking`] without the management API (an instance that only
    /// authenticates devices: the API is served by others sharing the store).
    ///
    /// # Errors
    /// [`RegistryError`] for bad config or an unusable store.
    pub async fn start_without_api(
        config: &RegistryConfig,
        data_dir: &Path,
        shutdown: CancellationToken,
    ) -> Result<Self, RegistryError> {
        config.validate()?;
        let verifiers = open_verifiers(config, data_dir)?;
        let store = open_store(config, data_dir).await?;
        let pool = HashPool::new(config.hash_pool_size);
        let settings = AuthSettings { verifiers: verifiers.clone(), ..config.auth_settings() };
        let auth = AuthService::new(store.clone(), pool.clone(), settings);
        let management = Management::new(store, pool.clone());
        let tracker = TaskTracker::new();
        spawn_verifier_writer(&tracker, verifiers, shutdown.clone());
        Ok(Self { local_addr: None, auth, management, pool, shutdown, tracker })
    }

    /// Like [`Registry::start`] over an already opened store (tests, or a binary that
    /// shares one store between components).
    ///
    /// # Errors
    /// [`RegistryError::Bind`] if the address cannot be bound.
    pub async fn start_with_store(
        config: &RegistryConfig,
        store: Arc<dyn RegistryStore>,
        shutdown: CancellationToken,
    ) -> Result<Self, RegistryError> {
        Self::start_with_states(config, store, shutdown, None).await
    }

    /// [`Registry::start_with_store`], serving devices' connection state from `states`
    /// at `/v1/state/TENANT[/DEVICE]`.
    ///
    /// # Errors
    /// [`RegistryError::Bind`] if the address cannot be bound.
    pub async fn start_with_states(
        config: &RegistryConfig,
        store: Arc<dyn RegistryStore>,
        shutdown: CancellationToken,
        states: Option<Arc<dyn crate::api::DeviceStates>>,
    ) -> Result<Self, RegistryError> {
        Self::start_inner(config, store, shutdown, states, None).await
    }

    async fn start_inner(
        config: &RegistryConfig,
        store: Arc<dyn RegistryStore>,
        shutdown: CancellationToken,
        states: Option<Arc<dyn crate::api::DeviceStates>>,
        verifiers: Option<Arc<Verifiers>>,
    ) -> Result<Self, RegistryError> {
        config.validate()?;
        let pool = HashPool::new(config.hash_pool_size);
        let settings = AuthSettings { verifiers: verifiers.clone(), ..config.auth_settings() };
        let auth = AuthService::new(store.clone(), pool.clone(), settings);
        let management = Management::new(store, pool.clone());
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| RegistryError::Bind { addr: config.listen, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| RegistryError::Bind { addr: config.listen, source })?;
        if config.allow_anonymous {
            tracing::warn!(
                "management API allows anonymous access (registry.allow_anonymous = true)"
            );
        } else if config.auth_tokens.is_empty() {
            tracing::warn!("management API has no auth_tokens: every request will get 401");
        }
        let state = Arc::new(ApiState {
            management: management.clone(),
            tokens: config.auth_tokens.clone(),
            allow_anonymous: config.allow_anonymous,
            max_body_bytes: config.max_body_bytes,
            states,
        });
        let tracker = TaskTracker::new();
        let admission = ferrule_net::listener::Admission::new(
            "registry",
            config.max_connections,
            config.source_limits(),
        );
        let tls = if config.tls.enabled() {
            Some(config.tls.acceptor().map_err(|e| RegistryError::Tls(e.to_string()))?)
        } else {
            None
        };
        spawn_verifier_writer(&tracker, verifiers, shutdown.clone());
        tracker.spawn(accept_loop(
            listener,
            tls,
            state,
            admission,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!(%local_addr, "device registry management API listening");
        Ok(Self { local_addr: Some(local_addr), auth, management, pool, shutdown, tracker })
    }

    /// The bound API address (useful with port 0).
    ///
    /// # Panics
    /// The registry was started without its API ([`Registry::start_without_api`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr.expect("the management API is on")
    }

    /// The bound API address, `None` if the API is off.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The authentication service for protocol adapters.
    pub fn auth(&self) -> &AuthService {
        &self.auth
    }

    /// The bounded pool every password check and hash of this registry runs on; share it
    /// with the AMQP endpoint so that the whole process has one bound.
    pub fn hash_pool(&self) -> &HashPool {
        &self.pool
    }

    /// Management operations (for in-process provisioning).
    pub fn management(&self) -> &Management {
        &self.management
    }

    /// Cancels the shutdown token and waits for connections to drain.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.stopped().await;
    }

    /// Waits until the API stopped after the shutdown token was cancelled.
    pub async fn stopped(self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Serves the registry until `shutdown` is cancelled (what `ferrule serve` calls).
/// `ready` gets the bound address and the [`AuthService`] once the API listens.
///
/// # Errors
/// [`RegistryError`] if start-up fails.
pub async fn run(
    config: RegistryConfig,
    data_dir: &Path,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<(SocketAddr, AuthService)>>,
) -> Result<(), RegistryError> {
    let registry = Registry::start(&config, data_dir, shutdown.clone()).await?;
    if let Some(ready) = ready {
        let _ = ready.send((registry.local_addr(), registry.auth().clone()));
    }
    shutdown.cancelled().await;
    registry.stopped().await;
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<ferrule_net::tls::TlsAcceptor>,
    state: Arc<ApiState>,
    admission: Arc<ferrule_net::listener::Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let serve_shutdown = shutdown.clone();
    let serving = move |connection, _peer| {
        serve(TokioIo::new(connection), state.clone(), serve_shutdown.clone())
    };
    ferrule_net::listener::serve_maybe_tls(listener, tls, admission, shutdown, tracker, serving)
        .await;
}

/// Serves one management connection (plain or TLS).
async fn serve<Io>(io: Io, state: Arc<ApiState>, shutdown: CancellationToken)
where
    Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| api::handle(state.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "management connection ended with error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_GRACE, conn).await;
        }
    }
}
