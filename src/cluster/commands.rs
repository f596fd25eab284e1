//! Commands between instances: subscriptions as leases, hand-over to the holding
//! instance's AMQP endpoint, deferred commands kept in Redis.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;

use super::leases::{now_ms, RedisConn, RedisLeases};

/// Where each instance's AMQP listener is, for the others (`HSET ferrule:instances`).
const INSTANCES_KEY: &str = "ferrule:instances";
/// How long a peer's address is reused before it is read again (a restarted instance
/// may come back elsewhere).
const PEER_ADDRESS_TTL: Duration = Duration::from_secs(30);

/// Commands between instances: subscriptions as leases in Redis, and each command or
/// response for another instance sent straight to that instance's AMQP endpoint (as
/// `ferrule-peer@TENANT`), so that its outcome (the device's) comes back on the same link.
#[derive(Clone)]
pub struct ClusterCommands(Arc<CommandsInner>);

struct CommandsInner {
    leases: Arc<RedisLeases>,
    broker: ferrule_messaging::Broker,
    password: String,
    outcome_timeout: Duration,
    /// `[cluster] peer_tls_ca_file`: other instances are reached only over TLS, verified
    /// against it (`None`: over whatever they announced).
    peer_tls: Option<std::path::PathBuf>,
    /// instance → (its advertised AMQP address, when read).
    addresses: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// advertised address → relay.
    relays: Mutex<HashMap<String, ferrule_messaging::remote::Relay>>,
}

/// The SASL user instances present to each other (`ferrule-peer@TENANT`).
pub const PEER_USER: &str = "ferrule-peer@*";

impl ClusterCommands {
    /// Announces this instance at `advertise` (`HOST:PORT`, or `amqps://HOST:PORT` for its
    /// TLS listener) and routes commands through `leases`; with `peer_tls`, only to
    /// instances that announced a TLS listener, verified against those CA certificates.
    ///
    /// # Errors
    /// Redis refused the announcement.
    pub async fn start(
        leases: Arc<RedisLeases>,
        broker: ferrule_messaging::Broker,
        advertise: &str,
        password: &str,
        outcome_timeout: Duration,
        peer_tls: Option<std::path::PathBuf>,
    ) -> anyhow::Result<Self> {
        let announce =
            redis::cmd("HSET").arg(INSTANCES_KEY).arg(&leases.instance).arg(advertise).clone();
        leases.conn.query::<()>(&announce).await.context("announcing this instance in Redis")?;
        Ok(Self(Arc::new(CommandsInner {
            leases,
            broker,
            password: password.to_owned(),
            outcome_timeout,
            peer_tls,
            addresses: Default::default(),
            relays: Default::default(),
        })))
    }

    /// Ends the connections to other instances.
    pub async fn close(&self) {
        let relays: Vec<_> =
            self.0.relays.lock().expect("poisoned").drain().map(|(_, r)| r).collect();
        for relay in relays {
            relay.close().await;
        }
    }
}

impl CommandsInner {
    async fn address_of(&self, instance: &str) -> Option<String> {
        if let Some((address, at)) = self.addresses.lock().expect("poisoned").get(instance) {
            if at.elapsed() < PEER_ADDRESS_TTL {
                return Some(address.clone());
            }
        }
        let get = redis::cmd("HGET").arg(INSTANCES_KEY).arg(instance).clone();
        let address: Option<String> = match self.leases.conn.query(&get).await {
            Ok(address) => address,
            Err(e) => {
                metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                tracing::warn!(error = %e, instance, "peer address look-up failed");
                None
            }
        };
        let address = address?;
        if self.peer_tls.is_some() && !address.starts_with("amqps://") {
            metrics::counter!("ferrule_cluster_peer_refused_total").increment(1);
            tracing::warn!(
                instance,
                "not handing commands to an instance that announced a plain AMQP address: \
                 [cluster] peer_tls_ca_file asks for TLS between instances"
            );
            return None;
        }
        self.addresses
            .lock()
            .expect("poisoned")
            .insert(instance.to_owned(), (address.clone(), std::time::Instant::now()));
        Some(address)
    }

    fn relay(&self, address: &str) -> ferrule_messaging::remote::Relay {
        let mut relays = self.relays.lock().expect("poisoned");
        relays
            .entry(address.to_owned())
            .or_insert_with(|| {
                let (url, tls_ca_file) = if address.starts_with("amqps://") {
                    (address.to_owned(), self.peer_tls.clone())
                } else {
                    (format!("amqp://{address}"), None)
                };
                let config = ferrule_messaging::BackendConfig {
                    kind: ferrule_messaging::BackendKind::Amqp,
                    urls: vec![url],
                    tls_ca_file,
                    username: PEER_USER.into(),
                    password: self.password.clone(),
                    addresses: ferrule_messaging::AddressScheme::Hono,
                    outcome_timeout: self.outcome_timeout,
                    ..Default::default()
                };
                ferrule_messaging::remote::Relay::new(&self.broker, &config, &self.leases.instance)
            })
            .clone()
    }

    /// The members of `key` (none when Redis cannot be read: the command is then
    /// handled as for a device that is not connected).
    async fn members_or_none(&self, key: &str) -> Vec<String> {
        match self.leases.members(key).await {
            Ok(members) => members,
            Err(e) => {
                metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                tracing::warn!(error = %e, "command subscription look-up failed");
                Vec::new()
            }
        }
    }
}

impl ferrule_command_control::CommandCluster for ClusterCommands {
    fn instance(&self) -> &str {
        &self.0.leases.instance
    }

    fn hold(&self, tenant: &str, target: &ferrule_command_control::Target) -> Box<dyn Send + Sync> {
        use ferrule_command_control::Target;
        let leases = &self.0.leases;
        let me = leases.instance.clone();
        Box::new(match target {
            Target::Device(device) => leases.hold(device_key(tenant, device), me),
            Target::AllDevicesOf { gateway } => {
                leases.hold(gateways_key(tenant), format!("{gateway}\n{me}"))
            }
        })
    }

    fn device_holders(
        &self,
        tenant: &str,
        device: &str,
    ) -> ferrule_command_control::BoxFuture<Vec<String>> {
        let (this, key) = (self.0.clone(), device_key(tenant, device));
        Box::pin(async move { this.members_or_none(&key).await })
    }

    fn gateway_holders(
        &self,
        tenant: &str,
    ) -> ferrule_command_control::BoxFuture<Vec<(String, String)>> {
        let (this, key) = (self.0.clone(), gateways_key(tenant));
        Box::pin(async move {
            let members = this.members_or_none(&key).await;
            members
                .into_iter()
                .filter_map(|m| m.split_once('\n').map(|(g, i)| (g.to_owned(), i.to_owned())))
                .collect()
        })
    }

    fn send(
        &self,
        instance: &str,
        tenant: &str,
        address: &str,
        message: ferrule_messaging::Message,
    ) -> ferrule_command_control::BoxFuture<ferrule_messaging::Outcome> {
        let this = self.0.clone();
        let (instance, tenant, address) =
            (instance.to_owned(), tenant.to_owned(), address.to_owned());
        Box::pin(async move {
            let Some(peer) = this.address_of(&instance).await else {
                tracing::debug!(%instance, "no address known for the instance");
                return ferrule_messaging::Outcome::Released;
            };
            let relay = this.relay(&peer);
            relay.send(&tenant, &address, message, false).outcome().await
        })
    }

    fn defer(
        &self,
        tenant: &str,
        device: &str,
        message: ferrule_messaging::Message,
        expires: u64,
    ) -> ferrule_command_control::BoxFuture<ferrule_messaging::Outcome> {
        use ferrule_messaging::{message::condition, Outcome};
        let (this, key) = (self.0.clone(), deferred_key(tenant, device));
        Box::pin(async move {
            let Some(entry) = encode_deferred(&message, expires) else {
                return Outcome::rejected(condition::DECODE_ERROR, "the command does not encode");
            };
            let ttl = expires.saturating_sub(now_ms()).max(1);
            let script = redis::Script::new(DEFER_SCRIPT);
            let mut call = script.key(&key);
            call.arg(entry).arg(MAX_DEFERRED_PER_DEVICE).arg(ttl);
            let kept: redis::RedisResult<i64> = match this.leases.conn.clone() {
                RedisConn::Cluster(mut c) => call.invoke_async(&mut c).await,
                RedisConn::Single(mut c) => call.invoke_async(&mut c).await,
            };
            match kept {
                Ok(1) => Outcome::Accepted,
                Ok(_) => Outcome::rejected(
                    condition::RESOURCE_LIMIT_EXCEEDED,
                    format!("the device has {MAX_DEFERRED_PER_DEVICE} deferred commands"),
                ),
                Err(e) => {
                    metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                    tracing::warn!(error = %e, "could not keep a deferred command");
                    Outcome::Released
                }
            }
        })
    }

    fn next_deferred(
        &self,
        tenant: &str,
        device: &str,
    ) -> ferrule_command_control::BoxFuture<Option<ferrule_messaging::Message>> {
        let (this, key) = (self.0.clone(), deferred_key(tenant, device));
        Box::pin(async move {
            loop {
                let head: Option<Vec<u8>> =
                    match this.leases.conn.query(redis::cmd("LINDEX").arg(&key).arg(0)).await {
                        Ok(head) => head,
                        Err(e) => {
                            metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                            tracing::warn!(error = %e, "could not read deferred commands");
                            return None;
                        }
                    };
                match decode_deferred(&head?) {
                    Some((expiry, message)) if expiry > now_ms() => return Some(message),
                    // Expired, or unreadable: dropped.
                    _ => {
                        let _ = this.leases.conn.query::<()>(redis::cmd("LPOP").arg(&key)).await;
                    }
                }
            }
        })
    }

    fn pop_deferred(&self, tenant: &str, device: &str) -> ferrule_command_control::BoxFuture<()> {
        let (this, key) = (self.0.clone(), deferred_key(tenant, device));
        Box::pin(async move {
            if let Err(e) = this.leases.conn.query::<()>(redis::cmd("LPOP").arg(&key)).await {
                metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                tracing::warn!(error = %e, "could not remove a delivered deferred command");
            }
        })
    }
}

/// Most commands kept for one device in cluster mode; beyond, the application's command
/// is rejected (`amqp:resource-limit-exceeded`).
const MAX_DEFERRED_PER_DEVICE: usize = 100;

/// Appends a kept command unless the device has [`MAX_DEFERRED_PER_DEVICE`]; the list
/// lives as long as its longest-lived command.
const DEFER_SCRIPT: &str = r#"
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#;

fn deferred_key(tenant: &str, device: &str) -> String {
    format!("ferrule:{{{tenant}}}:deferred:{device}")
}

/// A kept command as stored: its expiry (ms since the epoch, 8 bytes big-endian), then
/// the AMQP-encoded message.
fn encode_deferred(message: &ferrule_messaging::Message, expires: u64) -> Option<Vec<u8>> {
    let mut bytes = expires.to_be_bytes().to_vec();
    bytes.extend(ferrule_messaging::message::encode(message).ok()?);
    Some(bytes)
}

fn decode_deferred(bytes: &[u8]) -> Option<(u64, ferrule_messaging::Message)> {
    let (expiry, message) = bytes.split_at_checked(8)?;
    let expiry = u64::from_be_bytes(expiry.try_into().ok()?);
    Some((expiry, ferrule_messaging::message::decode(message).ok()?))
}

fn device_key(tenant: &str, device: &str) -> String {
    format!("ferrule:{{{tenant}}}:cmd:d:{device}")
}

fn gateways_key(tenant: &str) -> String {
    format!("ferrule:{{{tenant}}}:cmd:gw")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_entries_round_trip() {
        let message = ferrule_messaging::message::data_message(b"later".to_vec());
        let bytes = encode_deferred(&message, 1_234).unwrap();
        assert_eq!(decode_deferred(&bytes), Some((1_234, message)));
        assert_eq!(decode_deferred(&bytes[..5]), None);
    }
}
