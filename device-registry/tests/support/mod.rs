//! Test support: a real redis-server per test, and an in-process registry on 127.0.0.1:0.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrule_device_registry::client::RegistryClient;
use ferrule_device_registry::{EmbeddedStore, RedisStore, Registry, RegistryConfig, RegistryStore};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-operator-token-0123456789";

/// A redis-server child process on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` from PATH. Fails the test (does not skip) if it is missing:
    /// CI installs it (Debian package `redis-server`).
    pub async fn start() -> Self {
        let port = StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server from PATH ({e}); install it (apt-get install redis-server)")
            });
        let server = Self { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = redis::Client::open(server.url()) {
                if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {port} did not answer PING within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn store(&self) -> Arc<dyn RegistryStore> {
        Arc::new(
            RedisStore::connect(&self.url(), "ferrule:test").await.expect("connect to test redis"),
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn embedded_store() -> (Arc<dyn RegistryStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store =
        EmbeddedStore::open(&dir.path().join("registry.redb")).expect("open embedded store");
    (Arc::new(store), dir)
}

pub fn test_config() -> RegistryConfig {
    RegistryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        auth_tokens: vec![TOKEN.to_owned()],
        ..RegistryConfig::default()
    }
}

/// A registry serving its API in-process.
pub struct TestRegistry {
    pub registry: Registry,
    pub shutdown: CancellationToken,
    pub data_dir: Option<tempfile::TempDir>,
}

impl TestRegistry {
    pub async fn embedded() -> Self {
        let (store, dir) = embedded_store();
        let mut r = Self::with_store(store, test_config()).await;
        r.data_dir = Some(dir);
        r
    }

    /// An embedded registry and a client authenticated with [`TOKEN`].
    pub async fn embedded_with_client() -> (Self, RegistryClient) {
        let reg = Self::embedded().await;
        let client = reg.client();
        (reg, client)
    }

    pub async fn with_store(store: Arc<dyn RegistryStore>, config: RegistryConfig) -> Self {
        let shutdown = CancellationToken::new();
        let registry = Registry::start_with_store(&config, store, shutdown.clone())
            .await
            .expect("start registry");
        Self { registry, shutdown, data_dir: None }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.registry.local_addr())
    }

    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.base_url(), Some(TOKEN.to_owned())).unwrap()
    }

    pub fn anonymous_client(&self) -> RegistryClient {
        RegistryClient::new(&self.base_url(), None).unwrap()
    }

    pub fn data_path(&self) -> PathBuf {
        self.data_dir.as_ref().map(|d| d.path().to_owned()).unwrap_or_default()
    }
}

/// Polls `f` until it returns true or `limit` passes; returns the time it took.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
