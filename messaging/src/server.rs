//! The AMQP 1.0 listener: connections, sessions and links of applications, wired to the
//! broker. fe2o3-amqp speaks the protocol; this module decides who may attach where and
//! moves deliveries between links and nodes.
//!
//! - A client *sender* (server-side receiver) is a producer: each transfer is submitted to
//!   the broker and settled with the broker's outcome (accepted only once a consumer took
//!   it or it is on disk). A link without a target is an anonymous relay that routes by
//!   each message's `to`.
//! - A client *receiver* (server-side sender) is a consumer that prefetches up to
//!   `consumer_prefetch` messages and keeps at most `consumer_window` deliveries
//!   unsettled; the client's outcome settles the delivery in
//!   the broker (released ones are redelivered).
//! - A refused link is attached and then closed with an error condition (fe2o3-amqp sends
//!   nothing if an attach is simply dropped, and the client would wait forever).
//!
//! Size: the AMQP connection task (SASL, open, sessions, every link kind and its refusals)
//! in one place, so that the order of checks on a link can be read top to bottom.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, ListenerSessionHandle, SessionAcceptor,
};
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{DetachError, LinkStateError, Receiver, RecvError, Sender};
use fe2o3_amqp::types::definitions::{self, ErrorCondition, Role, SenderSettleMode};
use fe2o3_amqp::types::messaging::{
    Accepted, Body, Modified, Rejected, Released, Source, TargetArchetype, TerminusDurability,
};
use fe2o3_amqp::types::performatives::Attach;
use fe2o3_amqp::types::primitives::{Symbol, Value};
use fe2o3_amqp::Sendable;
use ferrule_net::listener::Listeners;
use ferrule_net::tls::TlsAcceptor;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, SubscribeOptions};
use crate::config::MessagingConfig;
use crate::message::{condition, Message, Outcome};
use crate::sasl::{Authenticator, ConnectionSasl, Identity};

/// Errors that stop the listener.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The TLS certificate or key is unusable.
    #[error("messaging.tls: {0}")]
    Tls(#[from] ferrule_net::tls::TlsError),
}

/// A bound AMQP listener, ready to [`AmqpServer::run`].
pub struct AmqpServer {
    listeners: Listeners,
    broker: Broker,
    /// The pool application password checks run on; `None`: one of their own.
    hash_pool: Option<ferrule_net::hashing::HashPool>,
    config: Arc<MessagingConfig>,
}

impl AmqpServer {
    /// Binds the listeners; application logins get a hashing pool of their own
    /// (see [`AmqpServer::with_hash_pool`] to share the platform's).
    pub async fn bind(config: &MessagingConfig, broker: Broker) -> Result<Self, ServerError> {
        let tls = match config.tls.enabled() {
            true => Some((config.listen_tls, config.tls.acceptor()?)),
            false => None,
        };
        let listeners = Listeners::bind(config.listen, tls)
            .await
            .map_err(|e| ServerError::Bind { addr: e.addr, source: e.source })?;
        Ok(Self { listeners, broker, hash_pool: None, config: Arc::new(config.clone()) })
    }

    /// Runs application password checks on `pool`, shared with the device registry, so
    /// that all password work in the process has one bound.
    #[must_use]
    pub fn with_hash_pool(mut self, pool: ferrule_net::hashing::HashPool) -> Self {
        self.hash_pool = Some(pool);
        self
    }

    /// The bound sockets (`amqp` and `amqps`).
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// Accepts connections until `shutdown`, then closes them and waits for their tasks.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        // Built once, here: its decoy argon2 hash costs a hashing run.
        let authenticator = Arc::new(match self.hash_pool {
            Some(pool) => Authenticator::with_pool(&self.config.sasl, pool),
            None => Authenticator::new(&self.config.sasl),
        });
        let connection = ConnectionTask {
            broker: self.broker.clone(),
            authenticator,
            config: self.config.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
        };
        // One cap for both listeners: they serve the same applications.
        let admission = ferrule_net::listener::Admission::new(
            "amqp",
            self.config.max_connections,
            self.config.source_limits(),
        );
        if let Some((listener, acceptor)) = self.listeners.tls {
            tracing::info!(addr = %listener.local_addr().expect("bound"), "AMQP TLS listener up");
            let connection = connection.clone();
            tasks.spawn(accept_loop(listener, connection, Some(acceptor), admission.clone()));
        }
        let listener = self.listeners.plain;
        tracing::info!(addr = %listener.local_addr().expect("bound"), "AMQP listener up");
        accept_loop(listener, connection, None, admission).await;
        tasks.close();
        tasks.wait().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    connection: ConnectionTask,
    tls: Option<TlsAcceptor>,
    admission: Arc<ferrule_net::listener::Admission>,
) {
    let (shutdown, tasks) = (connection.shutdown.clone(), connection.tasks.clone());
    // fe2o3-amqp's own TLS acceptor expects the AMQP TLS header first, which ordinary
    // amqps clients do not send: TLS is terminated here instead.
    let serving = move |stream: ferrule_net::listener::Connection, peer| {
        let connection = connection.clone();
        async move {
            keep_alive(ferrule_net::listener::tcp(&stream), connection.config.idle_timeout);
            connection.run(stream, peer).await;
        }
    };
    ferrule_net::listener::serve_maybe_tls(listener, tls, admission, shutdown, tasks, serving)
        .await;
}

/// TCP keep-alive, so that a peer whose host vanished (no FIN) is noticed even if it
/// never advertised an idle timeout of its own.
fn keep_alive(stream: &tokio::net::TcpStream, after: std::time::Duration) {
    let keepalive = socket2::TcpKeepalive::new().with_time(after).with_interval(after / 4);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keep-alive");
    }
}

/// Bytes of outgoing frames buffered per connection before the engine waits for the socket.
const COALESCE_MAX_BUFFER: usize = 256 * 1024;

#[derive(Clone)]
struct ConnectionTask {
    broker: Broker,
    authenticator: Arc<Authenticator>,
    config: Arc<MessagingConfig>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ConnectionTask {
    async fn run<Io>(self, stream: Io, peer: SocketAddr)
    where
        Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::fmt::Debug + Send + Unpin + 'static,
    {
        let identity = Arc::new(OnceLock::new());
        let sasl = ConnectionSasl {
            authenticator: self.authenticator.clone(),
            identity: identity.clone(),
            source: peer.ip(),
        };
        let acceptor = ConnectionAcceptor::builder()
            .container_id("ferrule")
            .max_frame_size(self.config.max_frame_size)
            .idle_time_out(self.config.idle_timeout.as_millis().min(u32::MAX as u128) as u32)
            .add_offered_capabilities(Symbol::from("ANONYMOUS-RELAY"))
            .sasl_acceptor(sasl)
            .build();
        // Every frame is checked before fe2o3-amqp decodes it (nesting depth; see guard.rs).
        let container_id = Arc::new(OnceLock::new());
        let checker = crate::guard::FrameChecker::new(
            self.config.max_frame_size,
            self.config.max_message_size as usize,
        )
        .recording_container_id(container_id.clone());
        let stream = crate::guard::Guarded::new(stream, checker);
        // One write syscall per batch of frames instead of one per frame (see coalesce.rs).
        let stream = crate::coalesce::Coalesced::new(stream, COALESCE_MAX_BUFFER, &self.tasks);
        // Protocol header, SASL and open must all come within connect_timeout.
        let mut connection = match tokio::time::timeout(
            self.config.connect_timeout,
            acceptor.accept(stream),
        )
        .await
        {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "AMQP connection not opened");
                return;
            }
            Err(_) => {
                ferrule_net::listener::count_pre_auth_timeout("amqp");
                tracing::debug!(%peer, "AMQP connection not opened in time");
                return;
            }
        };
        let Some(identity) = identity.get().cloned() else {
            // The client skipped SASL; nothing is allowed without an identity.
            tracing::info!(%peer, "closing unauthenticated AMQP connection");
            let _ = connection
                .close_with_error(error(condition::UNAUTHORIZED_ACCESS, "authentication required"))
                .await;
            return;
        };
        // Names durable subscriptions with the link name (AMQP 1.0 §2.6.1). Always set:
        // the guard saw the `open` before fe2o3-amqp did.
        let container_id: Arc<str> = container_id.get().map_or("", String::as_str).into();
        tracing::debug!(%peer, user = %identity.user, %container_id, "application connected");
        let session_acceptor = SessionAcceptor::new();
        let shutdown = &self.shutdown;
        while let Some(Some(incoming)) =
            shutdown.run_until_cancelled(connection.next_incoming_session()).await
        {
            match session_acceptor.accept_incoming_session(incoming, &mut connection).await {
                Ok(session) => {
                    let this = self.clone();
                    let peer =
                        Peer { identity: identity.clone(), container_id: container_id.clone() };
                    self.tasks.spawn(async move { this.session(session, peer).await });
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "session not begun");
                    break;
                }
            }
        }
        let _ = connection.close().await;
        tracing::debug!(%peer, "application disconnected");
    }

    async fn session(self, mut session: ListenerSessionHandle, peer: Peer) {
        let Peer { identity, container_id } = peer;
        let tenant_for_dynamic = identity.tenant.clone().unwrap_or_else(|| "anonymous".into());
        let link_acceptor = LinkAcceptor::builder()
            // Also what the guard under the connection relies on: a delivery over this is
            // refused by fe2o3-amqp as it arrives and never decoded.
            .max_message_size(self.config.max_message_size as u64)
            .on_dynamic_source(move |mut source: Source| {
                // The real consumer is created when the link task starts; the address is
                // reserved here so that the attach reply carries it.
                source.address = Some(format!(
                    "{}/{}/{}",
                    crate::address::DYNAMIC_PREFIX,
                    tenant_for_dynamic,
                    uuid::Uuid::new_v4().simple()
                ));
                Some(source)
            })
            .build();
        let shutdown = self.shutdown.clone();
        while let Some(Some(attach)) =
            shutdown.run_until_cancelled(session.next_incoming_attach()).await
        {
            let plan = self.plan(&attach, &identity, &container_id);
            let link = match link_acceptor.accept_incoming_attach(attach, &mut session).await {
                Ok(link) => link,
                Err(e) => {
                    // fe2o3-amqp sends nothing back for a failed attach (typically a link
                    // name already used on this session by the other direction: it keys
                    // links by name only). End the session with the reason rather than
                    // leave the client waiting forever.
                    tracing::info!(user = %identity.user, error = %e, "link attach failed; ending the session");
                    let description =
                        format!("link attach failed: {e} (use distinct link names per direction)");
                    let _ =
                        session.end_with_error(error(condition::NOT_ALLOWED, description)).await;
                    return;
                }
            };
            match (plan, link) {
                (Err(refusal), LinkEndpoint::Sender(sender)) => {
                    tracing::info!(user = %identity.user, reason = %refusal.1, "consumer link refused");
                    let _ = sender.close_with_error(error(refusal.0, refusal.1)).await;
                }
                (Err(refusal), LinkEndpoint::Receiver(receiver)) => {
                    tracing::info!(user = %identity.user, reason = %refusal.1, "producer link refused");
                    let _ = receiver.close_with_error(error(refusal.0, refusal.1)).await;
                }
                (Ok(Plan::Produce { address, presettled }), LinkEndpoint::Receiver(receiver)) => {
                    let broker = self.broker.clone();
                    let identity = identity.clone();
                    self.tasks
                        .spawn(producer_link(receiver, address, presettled, broker, identity));
                }
                (
                    Ok(Plan::Consume { address, presettled, durable_name }),
                    LinkEndpoint::Sender(sender),
                ) => {
                    let address = match address {
                        Some(address) => address,
                        None => match sender.source().as_ref().and_then(|s| s.address.clone()) {
                            Some(address) => address,
                            None => {
                                let _ = sender
                                    .close_with_error(error(
                                        condition::INTERNAL_ERROR,
                                        "no address",
                                    ))
                                    .await;
                                continue;
                            }
                        },
                    };
                    match self.broker.subscribe(&address, &SubscribeOptions { durable_name }) {
                        Ok(consumer) => {
                            let limits =
                                (self.config.consumer_prefetch, self.config.consumer_window);
                            self.tasks.spawn(consumer_link(sender, consumer, presettled, limits));
                        }
                        Err(e) => {
                            tracing::info!(user = %identity.user, %address, reason = %e, "consumer link refused");
                            let _ =
                                sender.close_with_error(error(e.condition(), e.to_string())).await;
                        }
                    }
                }
                (Ok(_), LinkEndpoint::Sender(sender)) => {
                    let _ = sender
                        .close_with_error(error(condition::INTERNAL_ERROR, "role mismatch"))
                        .await;
                }
                (Ok(_), LinkEndpoint::Receiver(receiver)) => {
                    let _ = receiver
                        .close_with_error(error(condition::INTERNAL_ERROR, "role mismatch"))
                        .await;
                }
            }
        }
        let _ = session.end().await;
    }

    /// Decides, from the attach alone, what a link will do or why it is refused.
    fn plan(
        &self,
        attach: &Attach,
        identity: &Identity,
        container_id: &str,
    ) -> Result<Plan, (&'static str, String)> {
        match attach.role {
            // The client sends: we receive into `target`.
            Role::Sender => {
                let address = match attach.target.as_deref() {
                    Some(TargetArchetype::Target(target)) => target.address.clone(),
                    #[allow(unreachable_patterns)]
                    _ => None,
                };
                if let Some(address) = &address {
                    check_address(&self.broker, address, identity)?;
                }
                Ok(Plan::Produce {
                    address,
                    presettled: attach.snd_settle_mode == SenderSettleMode::Settled,
                })
            }
            // The client receives from `source`.
            Role::Receiver => {
                let source = attach.source.as_deref();
                let presettled = attach.snd_settle_mode == SenderSettleMode::Settled;
                if source.is_some_and(|s| s.dynamic) {
                    return Ok(Plan::Consume { address: None, presettled, durable_name: None });
                }
                let address = source.and_then(|s| s.address.clone()).ok_or((
                    condition::INVALID_FIELD,
                    "a consumer link needs a source address".to_owned(),
                ))?;
                check_address(&self.broker, &address, identity)?;
                // A durable terminus names a durable topic subscription (container + link).
                let durable = source.is_some_and(|s| s.durable != TerminusDurability::None);
                let durable_name =
                    durable.then(|| durable_subscription_name(container_id, &attach.name));
                Ok(Plan::Consume { address: Some(address), presettled, durable_name })
            }
        }
    }
}

/// Whether `identity` may use `address`: the checks of a link's address at attach, and of
/// each message's `to` on an anonymous relay (the same rules, however a message arrives).
fn check_address(
    broker: &Broker,
    address: &str,
    identity: &Identity,
) -> Result<(), (&'static str, String)> {
    if !identity.may_use(address) {
        return Err((
            condition::UNAUTHORIZED_ACCESS,
            format!("{} may not use address {address}", identity.user),
        ));
    }
    if broker.is_internal(address) {
        return Err((condition::NOT_ALLOWED, format!("{address} is internal to Ferrule")));
    }
    if broker.address_type(address).is_none() {
        return Err((condition::NOT_FOUND, format!("address {address} does not exist")));
    }
    Ok(())
}

enum Plan {
    /// `address` `None`: anonymous relay, routed by each message's `to`.
    Produce { address: Option<String>, presettled: bool },
    /// `address` `None`: dynamic, made by the link acceptor.
    Consume { address: Option<String>, presettled: bool, durable_name: Option<String> },
}

/// An application connection's peer: who it authenticated as and its container id.
struct Peer {
    identity: Identity,
    container_id: Arc<str>,
}

/// The name of a durable topic subscription: a link is identified by its container and
/// its name (AMQP 1.0 §2.6.1), so two applications that pick the same link name get a
/// subscription each. `/` and `%` in the container id are escaped: no two pairs meet.
fn durable_subscription_name(container_id: &str, link_name: &str) -> String {
    let container_id = container_id.replace('%', "%25").replace('/', "%2F");
    format!("{container_id}/{link_name}")
}

fn error(condition: &str, description: impl Into<String>) -> definitions::Error {
    definitions::Error::new(
        ErrorCondition::Custom(Symbol::from(condition)),
        Some(description.into()),
        None,
    )
}

/// Submits each transfer of a producer link and settles it with the broker's outcome.
/// Outcomes are awaited concurrently, so a slow fsync does not serialise the link.
async fn producer_link(
    mut receiver: Receiver,
    address: Option<String>,
    presettled: bool,
    broker: Broker,
    identity: Identity,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            received = receiver.recv::<Body<Value>>() => match received {
                Ok(delivery) => {
                    let (info, message) = delivery.into_parts();
                    let submission = route(&broker, address.as_deref(), message, presettled, &identity);
                    pending.push(async move { (info, submission.outcome().await) });
                }
                Err(RecvError::LinkStateError(e)) => {
                    log_link_end(&e);
                    break;
                }
                Err(e) => {
                    tracing::info!(error = %e, "closing producer link after a bad transfer");
                    let _ = receiver.close_with_error(error(condition::DECODE_ERROR, e.to_string())).await;
                    return;
                }
            },
            Some((info, outcome)) = pending.next(), if !pending.is_empty() => {
                if dispose(&receiver, info, outcome).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = receiver.close().await;
}

fn route(
    broker: &Broker,
    address: Option<&str>,
    message: Message,
    presettled: bool,
    identity: &Identity,
) -> crate::Submission {
    use crate::Submission::Ready;
    let address = match address {
        Some(address) => address.to_owned(),
        None => {
            let to = message.properties.as_ref().and_then(|p| p.to.clone());
            let Some(to) = to else {
                return Ready(Outcome::rejected(
                    condition::INVALID_FIELD,
                    "anonymous relay needs `to`",
                ));
            };
            if let Err((condition, description)) = check_address(broker, &to, identity) {
                return Ready(Outcome::rejected(condition, description));
            }
            to
        }
    };
    broker.submit(&address, message, presettled)
}

async fn dispose(receiver: &Receiver, info: DeliveryInfo, outcome: Outcome) -> Result<(), ()> {
    let result = match outcome {
        Outcome::Accepted => receiver.dispose(info, Accepted {}).await,
        Outcome::Released => receiver.dispose(info, Released {}).await,
        Outcome::Rejected { condition, description } => {
            receiver.dispose(info, Rejected { error: Some(error(condition, description)) }).await
        }
        Outcome::Modified { delivery_failed, undeliverable_here } => {
            let modified = Modified {
                delivery_failed: Some(delivery_failed),
                undeliverable_here: Some(undeliverable_here),
                message_annotations: None,
            };
            receiver.dispose(info, modified).await
        }
    };
    result.map_err(|e| tracing::debug!(error = %e, "disposition not sent"))
}

/// Feeds a consumer link from the broker.
///
/// fe2o3-amqp does not expose the client's link credit, so the broker-side credit of the
/// consumer is a prefetch: `prefetch` messages may be handed to this task ahead of the
/// client's credit (they wait here, bounded, and are released if the link goes away).
/// One unit of credit comes back each time a message went out on the wire, as long as no
/// more than `window` deliveries are unsettled.
async fn consumer_link(
    mut sender: Sender,
    mut consumer: crate::Consumer,
    presettled: bool,
    limits: (u32, u32),
) {
    let (prefetch, window) = (limits.0.max(1), limits.1.max(1) as usize);
    let mut starved = 0u32;
    consumer.add_credit(prefetch);
    let mut in_flight = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Settlements first: a disposition that arrived before a detach must count.
            biased;
            Some((delivery, result)) = in_flight.next(), if !in_flight.is_empty() => {
                forward_outcome(&consumer, delivery, result, &mut starved);
            }
            detach = sender.on_detach() => {
                if matches!(detach, DetachError::ClosedByRemote) {
                    consumer.close_on_drop();
                }
                break;
            }
            delivery = consumer.recv() => {
                let Some(mut delivery) = delivery else { break };
                let message = delivery.take_message();
                let sendable = Sendable::builder().message(message).settled(presettled).build();
                // The send waits for the application's credit; outcomes of earlier
                // deliveries keep flowing meanwhile (an application with credit 1 that
                // accepted its message must not hold its producer until it asks for more).
                let send = sender.send_batchable(sendable);
                tokio::pin!(send);
                let sent = loop {
                    tokio::select! {
                        biased;
                        Some((earlier, result)) = in_flight.next(), if !in_flight.is_empty() => {
                            forward_outcome(&consumer, earlier, result, &mut starved);
                        }
                        sent = &mut send => break sent,
                    }
                };
                match sent {
                    Ok(settlement) => {
                        in_flight.push(async move { (delivery, settlement.await) });
                        if in_flight.len() < window {
                            consumer.add_credit(1);
                        } else {
                            starved += 1;
                        }
                    }
                    Err(e) => {
                        // `delivery` drops here: released, so another consumer gets it.
                        tracing::debug!(error = %e, "consumer link failed");
                        break;
                    }
                }
            }
        }
    }
    // Outcomes that already arrived still count; the rest are released when dropped.
    while let Some(Some((delivery, Ok(outcome)))) = in_flight.next().now_or_never() {
        delivery.settle(from_amqp(outcome));
    }
    drop(in_flight);
    drop(consumer);
    let _ = sender.close().await;
}

/// Forwards an application's outcome to the broker (and so to the producer), and gives
/// back the credit a full window held back.
fn forward_outcome<E>(
    consumer: &crate::Consumer,
    delivery: crate::Delivery,
    result: Result<fe2o3_amqp::types::messaging::Outcome, E>,
    starved: &mut u32,
) {
    delivery.settle(result.map_or(Outcome::Released, from_amqp));
    if *starved > 0 {
        *starved -= 1;
        consumer.add_credit(1);
    }
}

fn from_amqp(outcome: fe2o3_amqp::types::messaging::Outcome) -> Outcome {
    use fe2o3_amqp::types::messaging::Outcome as O;
    match outcome {
        O::Accepted(_) => Outcome::Accepted,
        O::Released(_) => Outcome::Released,
        O::Rejected(rejected) => Outcome::Rejected {
            condition: condition::INVALID_FIELD,
            description: rejected
                .error
                .and_then(|e| e.description)
                .unwrap_or_else(|| "rejected by consumer".into()),
        },
        O::Modified(modified) => Outcome::Modified {
            delivery_failed: modified.delivery_failed.unwrap_or(false),
            undeliverable_here: modified.undeliverable_here.unwrap_or(false),
        },
        #[allow(unreachable_patterns)]
        _ => Outcome::Released,
    }
}

fn log_link_end(e: &LinkStateError) {
    match e {
        LinkStateError::RemoteClosed | LinkStateError::RemoteDetached => {}
        other => tracing::debug!(error = %other, "producer link ended"),
    }
}

#[cfg(test)]
mod tests {
    use super::durable_subscription_name as name;

    #[test]
    fn durable_subscription_names_tell_container_and_link_apart() {
        assert_eq!(name("app-a", "sub"), "app-a/sub");
        assert_ne!(name("app-a", "sub"), name("app-b", "sub"));
        // A `/` (or an escape) in the container id cannot shift the boundary.
        assert_ne!(name("a/b", "c"), name("a", "b/c"));
        assert_ne!(name("a%2Fb", "c"), name("a/b", "c"));
    }
}
