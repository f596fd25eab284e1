//! Test support: a real redis-server per test, and an in-process registry on 127.0.0.1:0.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cluster;
pub mod tls;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
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

/// Ports handed out to redis-servers of this test process: below Linux's ephemeral range
/// (32768-60999), so no outgoing connection of anything on the machine can take one between
/// the check and the server's bind; the start offset depends on the process id, so test
/// binaries running at the same time rarely try the same ports.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
const PORT_BASE: u16 = 21_000;
const PORT_SPAN: u16 = 6_000;
/// A cluster node's bus port is its port plus this (still below the ephemeral range).
pub const BUS_OFFSET: u16 = 5_000;

pub fn candidate_port(with_bus: bool) -> u16 {
    let _ = NEXT_PORT.compare_exchange(
        0,
        (std::process::id() % u32::from(PORT_SPAN)) as u16 + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..PORT_SPAN {
        let p = PORT_BASE + NEXT_PORT.fetch_add(1, Ordering::Relaxed) % PORT_SPAN;
        let free = |port: u16| StdListener::bind(("127.0.0.1", port)).is_ok();
        if free(p) && (!with_bus || free(p + BUS_OFFSET)) {
            return p;
        }
    }
    panic!("no free loopback port in {PORT_BASE}..{}", PORT_BASE + PORT_SPAN);
}

/// Starts `redis-server` in `dir` with `args` on a free port and waits for its PING; if the
/// server exits before answering (another process took the port first), tries other ports.
/// The server logs to `dir/redis-PORT.log`; a failure panics with that log.
pub async fn spawn_redis(dir: &Path, args: &[&str], cluster: bool) -> (Child, u16) {
    let mut last_log = String::new();
    for _attempt in 0..5 {
        let port = candidate_port(cluster);
        let log = dir.join(format!("redis-{port}.log"));
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--daemonize", "no"])
            .arg("--logfile")
            .arg(&log)
            .arg("--dir")
            .arg(dir)
            .args(args);
        if cluster {
            cmd.args(["--cluster-port", &(port + BUS_OFFSET).to_string()])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")]);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server from PATH ({e}); install it (apt-get install redis-server)")
        });
        let url = format!("redis://127.0.0.1:{port}/");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = redis::Client::open(url.as_str()) {
                if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return (child, port);
                    }
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                last_log = std::fs::read_to_string(&log).unwrap_or_default();
                eprintln!("redis-server on port {port} exited ({status}), trying another port:\n{last_log}");
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "redis-server on port {port} did not answer PING within 10 s; its log:\n{log}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("redis-server exited on 5 ports in a row; the last log:\n{last_log}");
}

impl RedisServer {
    /// Starts `redis-server` from PATH. Fails the test (does not skip) if it is missing:
    /// CI installs it (Debian package `redis-server`).
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (child, port) = spawn_redis(dir.path(), &[], false).await;
        Self { child, port, _dir: dir }
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
