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
}
