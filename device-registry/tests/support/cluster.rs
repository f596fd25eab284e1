//! Test support: a private 3-master Redis Cluster on loopback, killed on drop.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrule_device_registry::{RedisStore, RegistryStore};

/// Key prefix of the stores [`RedisCluster::store`] opens.
pub const PREFIX: &str = "ferrule:test";

/// Whether `redis-server` and `redis-cli` can be run; else why not.
pub fn binaries_missing() -> Option<String> {
    for bin in ["redis-server", "redis-cli"] {
        let ran = Command::new(bin).arg("--version").stdout(Stdio::null()).status();
        if !matches!(ran, Ok(s) if s.success()) {
            return Some(format!("{bin} not found on PATH (apt-get install redis-server)"));
        }
    }
    None
}

/// Three `redis-server --cluster-enabled yes` children forming one cluster (no replicas).
pub struct RedisCluster {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create` and waits until
    /// every node reports `cluster_state:ok`.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Self { children: Vec::new(), ports: Vec::new(), dir };
        for _ in 0..3 {
            let (child, port) = super::spawn_redis(
                cluster.dir.path(),
                &["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"],
                true,
            )
            .await;
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        cluster.create();
        cluster.wait_until_ok().await;
        cluster
    }

    /// Assigns the slots over the three masters.
    fn create(&self) {
        let nodes: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}\nnode logs:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    async fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for &p in &self.ports {
            loop {
                let info: String = node_cmd(p, redis::cmd("CLUSTER").arg("INFO")).await;
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster not ok within 10 s: {info}\nnode logs:\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Every node's log, for failure messages.
    fn logs(&self) -> String {
        let read = |p: &u16| {
            let log = self.dir.path().join(format!("redis-{p}.log"));
            format!("--- node {p}\n{}", std::fs::read_to_string(log).unwrap_or_default())
        };
        self.ports.iter().map(read).collect::<Vec<_>>().join("\n")
    }

    /// The seed node URLs.
    pub fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect()
    }

    /// A store on this cluster (its own connections and pub/sub, as another instance).
    pub async fn store(&self) -> Arc<dyn RegistryStore> {
        Arc::new(
            RedisStore::connect_cluster(&self.urls(), PREFIX).await.expect("connect to cluster"),
        )
    }

    /// The keys node `port` holds itself (`KEYS` does not redirect).
    pub async fn keys_on(&self, port: u16) -> Vec<String> {
        node_cmd(port, redis::cmd("KEYS").arg("*")).await
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` on the one node at `port` (a plain connection, no cluster routing).
pub async fn node_cmd<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> T {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}
