//! Consuming from the shared broker: while an application consumes `telemetry/T` or
//! `event/T` on this instance, a bridge holds a receiver link at the broker and submits
//! each message to the local node, settling it at the broker with the application's
//! outcome. A bridge runs exactly while the local address has consumers: it is started
//! by the attach hook and checks, under the same lock, before it ends.

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::{CreditMode, ReceiverDisposer};
use fe2o3_amqp::Receiver;
use fe2o3_amqp_types::messaging::{Body, Source};
use fe2o3_amqp_types::primitives::Value;

use super::{Inner, Kind};
use crate::broker::AttachHook;
use crate::Outcome;

/// How often a bridge checks that the local address still has consumers, and waits
/// before attaching again after a failure.
const TICK: Duration = Duration::from_secs(1);

/// The [`AttachHook`] for `telemetry/` and `event/`.
pub(crate) struct Bridges(pub(crate) Arc<Inner>);

impl AttachHook for Bridges {
    fn attached(&self, address: &str) {
        let Some((kind, tenant)) = Kind::of(address) else { return };
        let mut bridges = self.0.bridges.lock().expect("poisoned");
        if bridges.insert(address.to_owned()) {
            let bridge = Bridge {
                inner: self.0.clone(),
                kind,
                tenant: tenant.to_owned(),
                address: address.to_owned(),
            };
            tokio::spawn(bridge.run());
        }
    }
}

struct Bridge {
    inner: Arc<Inner>,
    kind: Kind,
    tenant: String,
    address: String,
}

impl Bridge {
    async fn run(self) {
        // Telemetry consumers are announced to the other instances while this runs.
        let _lease = match (&self.inner.leases, self.kind) {
            (Some(leases), Kind::Telemetry) => Some(leases.hold(&self.address)),
            _ => None,
        };
        tracing::debug!(address = %self.address, "bridge from the shared broker started");
        loop {
            match self.attach().await {
                Ok(receiver) => self.pump(receiver).await,
                Err(e) => {
                    tracing::warn!(address = %self.address, error = %e, "cannot receive from the shared broker");
                    metrics::counter!("ferrule_backend_attach_failures_total").increment(1);
                    tokio::time::sleep(TICK).await;
                }
            }
            if self.finished() || self.inner.closing() {
                break;
            }
        }
        tracing::debug!(address = %self.address, "bridge from the shared broker ended");
    }

    /// True (and the bridge forgotten) if the local address has no consumer left.
    fn finished(&self) -> bool {
        let mut bridges = self.inner.bridges.lock().expect("poisoned");
        if self.inner.broker.consumer_count(&self.address) > 0 {
            return false;
        }
        bridges.remove(&self.address);
        true
    }

    async fn attach(&self) -> Result<(Receiver, fe2o3_amqp::session::SessionHandle<()>), String> {
        if self.kind == Kind::Event {
            self.inner.provision_events(&self.tenant).await?;
        }
        let mut session = self.inner.pool.session(&self.tenant).await?;
        let source = Source::builder()
            .address(self.inner.config.addresses.source(self.kind, &self.tenant))
            .build();
        let name = format!("{}-{}", self.inner.instance, uuid::Uuid::new_v4().simple());
        let attach = Receiver::builder()
            .name(name)
            .max_message_size(super::pool::MAX_MESSAGE_SIZE)
            .source(source)
            .credit_mode(CreditMode::Manual)
            .auto_accept(false)
            .attach(&mut session);
        let receiver = tokio::time::timeout(self.inner.config.outcome_timeout, attach)
            .await
            .map_err(|_| "attach timed out".to_owned())?
            .map_err(|e| format!("attach: {e}"))?;
        Ok((receiver, session))
    }

    /// Passes messages on until the link fails or the local consumers are gone; then
    /// detaches (RabbitMQ: detach, not close). Deliveries not yet settled go back to the
    /// broker with the link.
    ///
    /// Credit is granted by hand, from this task only: `credit` again once half of it is
    /// used and at most half of it is unsettled. fe2o3's automatic credit is refreshed
    /// from the settling tasks (its `ReceiverDisposer`) while transfers arrive; under load
    /// RabbitMQ 3.10 then sent more than the link allowed and the link ended ("The peer
    /// sent more message transfers than currently allowed on the link") every few
    /// hundred messages.
    async fn pump(
        &self,
        (mut receiver, _session): (Receiver, fe2o3_amqp::session::SessionHandle<()>),
    ) {
        let credit = self.inner.config.credit.max(2);
        let disposer = receiver.disposer();
        let settled = Arc::new(Settled::default());
        let mut received: u32 = 0;
        let mut remaining: u32 = 0;
        let mut tick = tokio::time::interval(TICK);
        loop {
            if remaining <= credit / 2 && received.wrapping_sub(settled.count()) <= credit / 2 {
                if let Err(e) = receiver.set_credit(credit).await {
                    tracing::warn!(address = %self.address, error = %e, "granting credit at the shared broker failed; attaching again");
                    return;
                }
                remaining = credit;
            }
            tokio::select! {
                _ = tick.tick() => {
                    if self.inner.broker.consumer_count(&self.address) == 0 {
                        break;
                    }
                }
                _ = settled.changed.notified(), if remaining == 0 => {}
                delivery = receiver.recv::<Body<Value>>(), if remaining > 0 => match delivery {
                    Ok(delivery) => {
                        received = received.wrapping_add(1);
                        remaining -= 1;
                        // Submitted unsettled either way: the local outcome decides.
                        let (info, message) = delivery.into_parts();
                        let submission = self.inner.broker.submit_local(&self.address, message, false);
                        tokio::spawn(settle(disposer.clone(), info, submission, settled.clone()));
                    }
                    Err(e) if self.inner.closing() => {
                        tracing::debug!(address = %self.address, error = %e, "bridge link closed with the shutdown");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(address = %self.address, error = %e, "receiving from the shared broker failed; attaching again");
                        tokio::time::sleep(TICK).await;
                        return;
                    }
                },
            }
        }
        let _ = tokio::time::timeout(TICK, receiver.detach()).await;
    }
}

/// How many deliveries of one link were settled, and a wake-up for the pump when that
/// moves.
#[derive(Default)]
struct Settled {
    count: std::sync::atomic::AtomicU32,
    changed: tokio::sync::Notify,
}

impl Settled {
    fn count(&self) -> u32 {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    fn one_more(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify_one();
    }
}

/// Settles a delivery at the broker with the local outcome. The broker's receiver
/// disposer can only accept or release: a message the application rejected is accepted
/// there (taken off the queue, counted), since releasing it would bring it back forever.
async fn settle(
    disposer: ReceiverDisposer,
    info: DeliveryInfo,
    submission: crate::Submission,
    settled: Arc<Settled>,
) {
    let result = match submission.outcome().await {
        Outcome::Accepted => disposer.accept(info).await,
        Outcome::Rejected { condition, description } => {
            tracing::debug!(condition, %description, "application rejected a message from the shared broker");
            metrics::counter!("ferrule_backend_rejected_by_application_total").increment(1);
            disposer.accept(info).await
        }
        Outcome::Released | Outcome::Modified { .. } => disposer.release(info).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "settling at the shared broker failed (it redelivers)");
    }
    settled.one_more();
}
