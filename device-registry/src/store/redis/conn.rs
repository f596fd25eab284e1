//! One connection type over a single Redis server or a Redis Cluster, and the pub/sub
//! relay of other instances' changes.
//!
//! The store's commands and scripts run over [`Conn`], which forwards to a
//! [`ConnectionManager`] (single server; reconnects by itself) or a cluster
//! [`ClusterConnection`] (routes each command by its key's slot and follows slot moves).
//! Pub/sub uses a plain connection to one node in both cases: a classic `PUBLISH` reaches
//! the subscribers on every node of a cluster, so one subscription per instance suffices,
//! and when its node goes away the relay moves on to the next seed node.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::super::{Change, StoreError};
use crate::model::{DeviceId, TenantId};

/// A connection to the store's Redis: cheap to clone (both variants multiplex).
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

/// Where the store's data lives.
#[derive(Clone, Copy, Debug)]
pub(super) enum Target<'a> {
    /// One server at this URL.
    Single(&'a str),
    /// A cluster reached through these seed node URLs.
    Cluster(&'a [String]),
}

/// A [`StoreError::Backend`] saying what failed, with the client's error.
pub(super) fn backend(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what}: {e}"))
}

/// Connects the command connection to `target`; also returns one pub/sub client per node
/// the relay may subscribe on (the server, or every seed node in the given order).
///
/// # Errors
/// [`StoreError::Backend`] if a URL is invalid or Redis cannot be reached.
pub(super) async fn connect(
    target: Target<'_>,
    tls: &crate::RedisTls,
) -> Result<(Conn, Vec<redis::Client>), StoreError> {
    match target {
        Target::Single(url) => {
            let client = tls.client(url).map_err(|e| backend("redis_url", e))?;
            let conn = ConnectionManager::new(client.clone())
                .await
                .map_err(|e| backend("connecting to Redis", e))?;
            Ok((Conn::Single(conn), vec![client]))
        }
        Target::Cluster(nodes) => {
            let clients = nodes
                .iter()
                .map(|n| tls.client(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| backend("redis_cluster_nodes", e))?;
            let cluster = tls
                .cluster(nodes.iter().map(String::as_str))
                .build()
                .map_err(|e| backend("redis_cluster_nodes", e))?;
            let conn = cluster
                .get_async_connection()
                .await
                .map_err(|e| backend("connecting to the Redis Cluster", e))?;
            Ok((Conn::Cluster(conn), clients))
        }
    }
}

/// The payload announcing `c` on the change channel.
pub(super) fn change_message(c: &Change) -> String {
    match c {
        Change::Tenant(t) => format!("T\t{t}"),
        Change::Device(t, d) => format!("D\t{t}\t{d}"),
        Change::All => "*".to_owned(),
    }
}

/// The change a payload from [`change_message`] announces.
pub(super) fn parse_change(payload: &str) -> Change {
    let mut parts = payload.split('\t');
    let tag = parts.next();
    let t = parts.next().and_then(|t| TenantId::new(t).ok());
    let d = parts.next().and_then(|d| DeviceId::new(d).ok());
    match (tag, t, d) {
        (Some("T"), Some(t), _) => Change::Tenant(t),
        (Some("D"), Some(t), Some(d)) => Change::Device(t, d),
        // Anything unexpected: be safe and drop everything.
        _ => Change::All,
    }
}

/// Subscribes to `channel` on `client` and relays its messages into `tx` until the
/// connection ends. Emits [`Change::All`] once subscribed: messages sent before were lost.
async fn relay_session(
    client: &redis::Client,
    channel: &str,
    tx: &broadcast::Sender<Change>,
) -> Result<(), redis::RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    let _ = tx.send(Change::All);
    let mut stream = pubsub.on_message();
    while let Some(msg) = stream.next().await {
        let payload: String = msg.get_payload().unwrap_or_default();
        let _ = tx.send(parse_change(&payload));
    }
    Ok(())
}

/// Relays pub/sub messages into the local broadcast until `stop`, subscribed on one of
/// `clients` at a time: when a session ends or cannot start, the next one is tried (a
/// second after a full round without success). After any session ends it emits
/// [`Change::All`]: messages sent while disconnected are lost.
pub(super) async fn relay_changes(
    clients: Vec<redis::Client>,
    channel: String,
    tx: broadcast::Sender<Change>,
    stop: CancellationToken,
) {
    let mut next = 0usize;
    loop {
        let node = next % clients.len().max(1);
        let Some(client) = clients.get(node) else { return };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = relay_session(client, &channel, &tx) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, node, "registry change subscription failed; trying the next node");
                }
            }
        }
        let _ = tx.send(Change::All);
        next = node + 1;
        if next == clients.len() {
            // A full round: pause before starting over.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
