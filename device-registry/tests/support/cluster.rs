//! Test support: a private 3-master Redis Cluster on loopback, killed on drop.

use std::net::TcpListener as StdListener;
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

/// A free loopback port `p` whose cluster bus port `p + 10000` is free too.
fn free_cluster_port(taken: &[u16]) -> u16 {
    for _ in 0..200 {
        let l = StdListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p > 55_535 || taken.contains(&p) {
            continue;
        }
        if StdListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair (p, p + 10000) on 127.0.0.1");
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
        let mut ports = Vec::new();
        for _ in 0..3 {
            ports.push(free_cluster_port(&ports));
        }
        let mut cluster = Self { children: Vec::new(), ports, dir };
        for i in 0..cluster.ports.len() {
            let child = cluster.spawn_node(cluster.ports[i]);
            cluster.children.push(child);
        }
        for &p in &cluster.ports {
            wait_for_ping(p).await;
        }
        cluster.create();
        cluster.wait_until_ok().await;
        cluster
    }

    fn spawn_node(&self, port: u16) -> Child {
        let p = port.to_string();
        let conf = format!("nodes-{port}.conf");
        Command::new("redis-server")
            .args(["--port", &p, "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &conf, "--cluster-node-timeout", "2000"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e})"))
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
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
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
                assert!(Instant::now() < deadline, "cluster not ok within 10 s: {info}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
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

async fn wait_for_ping(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("redis://127.0.0.1:{port}/");
    loop {
        if let Ok(c) = redis::Client::open(url.as_str()) {
            if let Ok(mut conn) = c.get_multiplexed_async_connection().await {
                let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "redis-server on port {port} did not answer PING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
