//! Leases in Redis, and the Redis connection cluster mode shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use ferrule_messaging::remote::ConsumerLeases;

use super::{ClusterConfig, RedisMode};

/// A Redis connection of either kind.
#[derive(Clone)]
pub(super) enum RedisConn {
    Cluster(redis::cluster_async::ClusterConnection),
    Single(redis::aio::ConnectionManager),
}

impl RedisConn {
    async fn connect(
        urls: &[String],
        mode: RedisMode,
        tls: &ferrule_device_registry::RedisTls,
    ) -> anyhow::Result<Self> {
        Ok(match mode {
            RedisMode::Cluster => {
                let client = tls
                    .cluster(urls.iter().map(String::as_str))
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(2))
                    .build()
                    .context("Redis Cluster URLs")?;
                RedisConn::Cluster(
                    client.get_async_connection().await.context("connecting to Redis Cluster")?,
                )
            }
            RedisMode::Single => {
                let url = urls.first().context("no Redis URL")?;
                let client = tls.client(url).context("Redis URL")?;
                RedisConn::Single(
                    redis::aio::ConnectionManager::new(client)
                        .await
                        .context("connecting to Redis")?,
                )
            }
        })
    }

    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self.clone() {
            RedisConn::Cluster(mut c) => cmd.query_async(&mut c).await,
            RedisConn::Single(mut c) => cmd.query_async(&mut c).await,
        }
    }
}

/// How long a lease lasts unless renewed; renewed every [`RENEW`].
const LEASE: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(1);

/// Leases in Redis: a sorted set per thing leased (its key's hash tag is the tenant, so a
/// tenant's keys live on one master), members scored by the time their lease ends. An
/// instance renews its own every second while it holds them; a dead instance's leases
/// end within [`LEASE`]. Used for application consumers (RabbitMQ gives no "no consumer"
/// signal) and command subscriptions (which instance a command goes to).
pub struct RedisLeases {
    pub(super) conn: RedisConn,
    pub(super) instance: String,
    /// (key, member) this instance holds, with how many holders each.
    held: Mutex<HashMap<(String, String), usize>>,
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lease_key(address: &str) -> String {
    let tenant = ferrule_messaging::address::tenant_of(address).unwrap_or("");
    format!("ferrule:{{{tenant}}}:consumers:{address}")
}

impl RedisLeases {
    /// Connects and renews this instance's leases until `stop`.
    pub async fn start(
        config: &ClusterConfig,
        instance: &str,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(!config.redis_urls.is_empty(), "[cluster] redis_urls is empty");
        let tls = config.redis_tls().context("[cluster] redis_tls_ca_file")?;
        let conn = RedisConn::connect(&config.redis_urls, config.redis_mode, &tls).await?;
        let leases =
            Arc::new(Self { conn, instance: instance.to_owned(), held: Default::default() });
        tokio::spawn(leases.clone().renew(stop));
        Ok(leases)
    }

    fn held(&self) -> Vec<(String, String)> {
        self.held.lock().expect("poisoned").keys().cloned().collect()
    }

    async fn renew(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RENEW);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (key, member) in self.held() {
                self.write(&key, &member, true).await;
            }
        }
        for (key, member) in self.held() {
            self.write(&key, &member, false).await;
        }
    }

    /// Adds (renews) or removes the lease of `member` in `key`.
    async fn write(&self, key: &str, member: &str, present: bool) {
        let result = if present {
            let expiry = now_ms() + LEASE.as_millis() as u64;
            let mut pipe = redis::pipe();
            pipe.zadd(key, member, expiry)
                .ignore()
                .zrembyscore(key, 0, now_ms())
                .ignore()
                .pexpire(key, (LEASE * 4).as_millis() as i64)
                .ignore();
            self.query_pipe(&pipe).await
        } else {
            self.conn.query::<()>(redis::cmd("ZREM").arg(key).arg(member)).await
        };
        if let Err(e) = result {
            metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
            tracing::warn!(error = %e, %key, "could not write a lease");
        }
    }

    /// The members of `key` whose lease has not ended.
    pub(super) async fn members(&self, key: &str) -> redis::RedisResult<Vec<String>> {
        self.conn.query(redis::cmd("ZRANGEBYSCORE").arg(key).arg(now_ms()).arg("+inf")).await
    }

    async fn query_pipe(&self, pipe: &redis::Pipeline) -> redis::RedisResult<()> {
        match self.conn.clone() {
            RedisConn::Cluster(mut c) => pipe.query_async(&mut c).await,
            RedisConn::Single(mut c) => pipe.query_async(&mut c).await,
        }
    }

    /// Holds the lease of `member` in `key` until the guard is dropped (written now,
    /// renewed meanwhile, removed at once when the last holder lets go).
    pub(super) fn hold(self: &Arc<Self>, key: String, member: String) -> LeaseGuard {
        let entry = (key, member);
        let first = {
            let mut held = self.held.lock().expect("poisoned");
            let n = held.entry(entry.clone()).or_default();
            *n += 1;
            *n == 1
        };
        if first {
            let leases = self.clone();
            let (key, member) = entry.clone();
            tokio::spawn(async move { leases.write(&key, &member, true).await });
        }
        LeaseGuard { leases: self.clone(), entry }
    }
}

pub(super) struct LeaseGuard {
    leases: Arc<RedisLeases>,
    entry: (String, String),
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let last = {
            let mut held = self.leases.held.lock().expect("poisoned");
            match held.get_mut(&self.entry) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    held.remove(&self.entry);
                    true
                }
            }
        };
        if last {
            let leases = self.leases.clone();
            let (key, member) = std::mem::take(&mut self.entry);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { leases.write(&key, &member, false).await });
            }
        }
    }
}

/// Consumer leases as the messaging backend asks for them.
pub struct Leases(pub Arc<RedisLeases>);

impl ConsumerLeases for Leases {
    fn has_consumer(&self, address: &str) -> BoxFuture<'static, bool> {
        let leases = self.0.clone();
        let key = lease_key(address);
        Box::pin(async move {
            let mine = (key.clone(), leases.instance.clone());
            if leases.held.lock().expect("poisoned").contains_key(&mine) {
                return true;
            }
            let count = redis::cmd("ZCOUNT").arg(&key).arg(now_ms()).arg("+inf").clone();
            match leases.conn.query::<u64>(&count).await {
                Ok(n) => n > 0,
                Err(e) => {
                    // Redis unreachable: send anyway (the broker may still have the
                    // consumer's queue) rather than refuse every device.
                    metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                    tracing::warn!(error = %e, "consumer lease look-up failed; assuming a consumer");
                    true
                }
            }
        })
    }

    fn hold(&self, address: &str) -> Box<dyn Send + Sync> {
        Box::new(self.0.hold(lease_key(address), self.0.instance.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_keys_hash_by_tenant() {
        assert_eq!(lease_key("telemetry/t1"), "ferrule:{t1}:consumers:telemetry/t1");
    }

    /// A CA and a server certificate for 127.0.0.1 it signed, as PEM files in `dir`.
    fn pki(dir: &std::path::Path) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "lease test CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        server.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        let cert = server.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    }

    /// A redis-server serving TLS only, on a port below the ephemeral range (tried until
    /// one is free), killed on drop.
    struct TlsRedis(std::process::Child, u16);

    impl TlsRedis {
        async fn start(dir: &std::path::Path) -> Self {
            let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
            let base = 28_000 + (std::process::id() % 900) as u16;
            for port in base..base + 20 {
                if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                    continue;
                }
                let mut child = std::process::Command::new("redis-server")
                    .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--tls-cert-file",
                        &file("server.pem"),
                        "--tls-key-file",
                        &file("server.key"),
                    ])
                    .args(["--tls-ca-cert-file", &file("ca.pem"), "--tls-auth-clients", "no"])
                    .args(["--save", "", "--appendonly", "no", "--dir", &file("")])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("redis-server on PATH (apt-get install redis-server)");
                for _ in 0..100 {
                    if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                        return Self(child, port);
                    }
                    if let Ok(Some(_)) = child.try_wait() {
                        break; // the port was taken meanwhile: try the next
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("no TLS redis-server could start on ports {base}..{}", base + 20);
        }
    }

    impl Drop for TlsRedis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Leases over TLS to Redis (`rediss://` and `redis_tls_ca_file`): a lease held is
    /// seen and gone once let go; without the CA (the system's roots) the server is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let redis = TlsRedis::start(dir.path()).await;
        let mut config = ClusterConfig {
            redis_urls: vec![format!("rediss://127.0.0.1:{}/", redis.1)],
            redis_mode: RedisMode::Single,
            redis_tls_ca_file: Some(dir.path().join("ca.pem")),
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let leases =
            RedisLeases::start(&config, "i1", stop.clone()).await.expect("TLS with the CA");
        let key = lease_key("telemetry/t1");
        let guard = leases.hold(key.clone(), "i1".into());
        let members = || async { leases.members(&key).await.unwrap() };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while members().await.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the lease was never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(members().await, ["i1"]);
        drop(guard);
        while !members().await.is_empty() {
            assert!(std::time::Instant::now() < deadline, "the lease was never removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();

        config.redis_tls_ca_file = None;
        let untrusted = tokio::time::timeout(
            Duration::from_secs(30),
            RedisLeases::start(&config, "i2", CancellationToken::new()),
        )
        .await
        .expect("a refused certificate fails, it does not hang");
        assert!(untrusted.is_err(), "the system's roots do not trust the private CA");
    }
}
