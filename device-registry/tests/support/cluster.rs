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
    /// With TLS: each node's TLS port (clients and the cluster bus use TLS).
    pub tls_ports: Vec<u16>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create` and waits until
    /// every node reports `cluster_state:ok`.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// [`RedisCluster::start`], with TLS for clients and the cluster bus when `tls` is given
    /// (the plain ports stay open for the test's own node commands).
    pub async fn start_with(tls: Option<&super::tls::TlsFiles>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster =
            Self { children: Vec::new(), ports: Vec::new(), tls_ports: Vec::new(), dir };
        for _ in 0..3 {
            let mut args: Vec<String> =
                ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                    .map(String::from)
                    .into();
            if let Some(tls) = tls {
                let tls_port = super::candidate_port(false);
                args.extend(tls.server_args(tls_port));
                args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
                cluster.tls_ports.push(tls_port);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (child, port) = super::spawn_redis(cluster.dir.path(), &args, true).await;
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        cluster.create(tls);
        cluster.wait_until_ok().await;
        cluster
    }

    /// Assigns the slots over the three masters.
    fn create(&self, tls: Option<&super::tls::TlsFiles>) {
        let ports = if tls.is_some() { &self.tls_ports } else { &self.ports };
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut cli = Command::new("redis-cli");
        if let Some(tls) = tls {
            cli.arg("--tls").arg("--cacert").arg(tls.ca());
        }
        let out = cli
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

    /// The seed node URLs of a cluster started with TLS (`rediss://`, the TLS ports).
    pub fn tls_urls(&self) -> Vec<String> {
        self.tls_ports.iter().map(|p| format!("rediss://127.0.0.1:{p}/")).collect()
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
