//! Producing to the shared broker: one actor per broker address, owning one sender link.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::link::SendError;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Sendable, Sender};
use fe2o3_amqp_types::definitions::SenderSettleMode;
use fe2o3_amqp_types::messaging::Outcome as WireOutcome;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::{not_carried, prepare, Inner, Kind};
use crate::message::condition;
use crate::{AddressHandler, Message, Outcome, Submission};

/// Messages waiting for one actor; beyond it producers get `released` at once (the broker
/// is behind: devices retry later instead of this instance filling its memory).
const QUEUE: usize = 4096;
/// An actor with nothing to do for this long detaches its link and ends.
const IDLE: Duration = Duration::from_secs(60);
/// After a failed attach, messages are answered `released` at once for this long.
const BACKOFF: Duration = Duration::from_secs(1);
/// How long a consumer lease answer is reused.
const LEASE_CACHE: Duration = Duration::from_millis(500);

pub(crate) struct Job {
    message: Message,
    settled: bool,
    reply: oneshot::Sender<Outcome>,
}

/// The [`AddressHandler`] for `telemetry/` and `event/`.
pub(crate) struct Forwarder(pub(crate) Arc<Inner>);

impl AddressHandler for Forwarder {
    fn submit(&self, address: &str, message: Message, settled: bool) -> Submission {
        let Some((kind, tenant)) = Kind::of(address) else { return not_carried(address) };
        let target = self.0.config.addresses.target(kind, tenant);
        enqueue(&self.0, Some(kind), tenant, &target, prepare(message, kind), settled)
    }
}

/// Hands a message to the actor of `target` (made if need be); the submission answers
/// with the broker's outcome. `kind` = what the shared broker carries (consumer leases,
/// event-queue provisioning); `None` for plain relaying (commands to a peer instance).
pub(crate) fn enqueue(
    inner: &Arc<Inner>,
    kind: Option<Kind>,
    tenant: &str,
    target: &str,
    message: Message,
    settled: bool,
) -> Submission {
    let (reply, rx) = oneshot::channel();
    let mut job = Job { message, settled, reply };
    // Two tries: the actor found may just have ended (idle), then a new one is made.
    for _ in 0..2 {
        let tx = {
            let mut senders = inner.senders.lock().expect("poisoned");
            match senders.get(target) {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(QUEUE);
                    senders.insert(target.to_owned(), tx.clone());
                    let actor = Actor::new(inner.clone(), kind, tenant, target.to_owned(), rx);
                    tokio::spawn(actor.run(tx.clone()));
                    tx
                }
            }
        };
        match tx.try_send(job) {
            Ok(()) => return Submission::Pending(rx),
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("ferrule_backend_refused_total", "reason" => "busy").increment(1);
                return Submission::Ready(Outcome::Released);
            }
            Err(mpsc::error::TrySendError::Closed(back)) => job = back,
        }
    }
    Submission::Ready(Outcome::Released)
}

type InFlight = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

struct Link {
    sender: Sender,
    /// Kept for the link's life: dropping it ends the session.
    _session: SessionHandle<()>,
}

struct Actor {
    inner: Arc<Inner>,
    kind: Option<Kind>,
    tenant: String,
    /// The local address (lease look-ups).
    address: String,
    target: String,
    rx: mpsc::Receiver<Job>,
    link: Option<Link>,
    failed_at: Option<Instant>,
    consumer: Option<(bool, Instant)>,
    in_flight: FuturesUnordered<InFlight>,
}

impl Actor {
    fn new(
        inner: Arc<Inner>,
        kind: Option<Kind>,
        tenant: &str,
        target: String,
        rx: mpsc::Receiver<Job>,
    ) -> Self {
        let prefix = if kind == Some(Kind::Event) { "event" } else { "telemetry" };
        Self {
            inner,
            kind,
            tenant: tenant.to_owned(),
            address: format!("{prefix}/{tenant}"),
            target,
            rx,
            link: None,
            failed_at: None,
            consumer: None,
            in_flight: FuturesUnordered::new(),
        }
    }

    async fn run(mut self, me: mpsc::Sender<Job>) {
        loop {
            tokio::select! {
                Some(()) = self.in_flight.next(), if !self.in_flight.is_empty() => {}
                job = tokio::time::timeout(IDLE, self.rx.recv()) => match job {
                    Ok(Some(job)) => self.handle(job).await,
                    Ok(None) => break,
                    Err(_) if self.in_flight.is_empty() => break,
                    Err(_) => {}
                },
            }
        }
        // Leave the map (unless a newer actor took the place), then answer what came in
        // meanwhile and what is still in flight.
        {
            let mut senders = self.inner.senders.lock().expect("poisoned");
            if senders.get(&self.target).is_some_and(|tx| tx.same_channel(&me)) {
                senders.remove(&self.target);
            }
        }
        drop(me);
        self.rx.close();
        while let Some(job) = self.rx.recv().await {
            self.handle(job).await;
        }
        while self.in_flight.next().await.is_some() {}
        if let Some(link) = self.link.take() {
            let _ = tokio::time::timeout(BACKOFF, link.sender.detach()).await;
        }
    }

    async fn handle(&mut self, job: Job) {
        if !job.settled && job.reply.is_closed() {
            return; // nobody waits for it any more
        }
        if self.kind == Some(Kind::Telemetry) && !self.consumer_present().await {
            let _ = job.reply.send(Outcome::Released);
            return;
        }
        let timeout = self.inner.config.outcome_timeout;
        // Pre-settled only where consumer leases answer "no consumer": otherwise the
        // broker's outcome is the only place that answer comes from (a Ferrule broker
        // releases telemetry nobody consumes), so at-most-once messages wait for it too.
        let presettled = job.settled && self.inner.leases.is_some();
        let Some(link) = self.link().await else {
            let _ = job.reply.send(Outcome::Released);
            return;
        };
        let sendable = Sendable::builder().message(job.message).settled(presettled).build();
        let sent = tokio::time::timeout(timeout, link.sender.send_batchable(sendable)).await;
        let outcome = match sent {
            Ok(Ok(outcome)) => outcome,
            failed => {
                match failed {
                    Ok(Err(e)) => {
                        tracing::warn!(target = %self.target, error = %e, "send failed; outcome unknown")
                    }
                    _ => {
                        tracing::warn!(target = %self.target, "no transfer taken within outcome_timeout")
                    }
                }
                metrics::counter!("ferrule_backend_outcome_unknown_total").increment(1);
                self.link = None;
                let _ = job.reply.send(Outcome::Released);
                return;
            }
        };
        if presettled {
            let _ = job.reply.send(Outcome::Accepted);
            return;
        }
        let reply = job.reply;
        self.in_flight.push(Box::pin(async move {
            let outcome = match tokio::time::timeout(timeout, outcome).await {
                Ok(result) => from_wire(result),
                Err(_) => {
                    metrics::counter!("ferrule_backend_outcome_unknown_total").increment(1);
                    Outcome::Released
                }
            };
            let _ = reply.send(outcome);
        }));
    }

    /// Whether some instance consumes this telemetry address (always, without leases:
    /// the broker answers `released` itself then).
    async fn consumer_present(&mut self) -> bool {
        let Some(leases) = &self.inner.leases else { return true };
        if let Some((present, at)) = self.consumer {
            if at.elapsed() < LEASE_CACHE {
                return present;
            }
        }
        let present = leases.has_consumer(&self.address).await;
        self.consumer = Some((present, Instant::now()));
        present
    }

    /// The sender link, attached if need be (not again within [`BACKOFF`] of a failure).
    async fn link(&mut self) -> Option<&mut Link> {
        if self.link.is_none() {
            if self.failed_at.is_some_and(|at| at.elapsed() < BACKOFF) {
                return None;
            }
            match attach(&self.inner, self.kind, &self.tenant, &self.target).await {
                Ok(link) => {
                    self.failed_at = None;
                    self.link = Some(link);
                }
                Err(e) => {
                    tracing::warn!(to = self.inner.label, target = %self.target, error = %e, "cannot attach");
                    metrics::counter!("ferrule_backend_attach_failures_total").increment(1);
                    self.failed_at = Some(Instant::now());
                    return None;
                }
            }
        }
        self.link.as_mut()
    }
}

/// Attaches a sender link for `target` on a session of its own.
async fn attach(
    inner: &Inner,
    kind: Option<Kind>,
    tenant: &str,
    target: &str,
) -> Result<Link, String> {
    if kind == Some(Kind::Event) {
        inner.provision_events(tenant).await?;
    }
    let mut session = inner.pool.session(tenant).await?;
    let name = format!("{}-{}", inner.instance, uuid::Uuid::new_v4().simple());
    let attach = Sender::builder()
        .name(name)
        .target(target)
        .sender_settle_mode(SenderSettleMode::Mixed)
        .attach(&mut session);
    let sender = tokio::time::timeout(inner.config.outcome_timeout, attach)
        .await
        .map_err(|_| "attach timed out".to_owned())?
        .map_err(|e| format!("attach: {e}"))?;
    Ok(Link { sender, _session: session })
}

/// The broker's outcome as the core's; a lost link or connection is `released` (unknown:
/// the producer may retry).
fn from_wire(result: Result<WireOutcome, SendError>) -> Outcome {
    match result {
        Ok(WireOutcome::Accepted(_)) => Outcome::Accepted,
        Ok(WireOutcome::Rejected(rejected)) => {
            let description = rejected
                .error
                .map(|e| format!("{:?}: {}", e.condition, e.description.unwrap_or_default()))
                .unwrap_or_else(|| "rejected by the shared broker".into());
            let condition = if description.contains("resource-limit-exceeded") {
                condition::RESOURCE_LIMIT_EXCEEDED
            } else {
                condition::INTERNAL_ERROR
            };
            Outcome::rejected(condition, description)
        }
        Ok(WireOutcome::Released(_)) | Ok(WireOutcome::Modified(_)) => Outcome::Released,
        #[allow(unreachable_patterns)]
        Ok(_) => Outcome::Released,
        Err(e) => {
            tracing::debug!(error = %e, "outcome lost with the link");
            metrics::counter!("ferrule_backend_outcome_unknown_total").increment(1);
            Outcome::Released
        }
    }
}
