//! The `hono-ttd` long poll shared by the HTTP and CoAP adapters: the request subscribes
//! for its device's commands, sends its upload (with the `ttd` property), and once that
//! was accepted waits up to `ttd` for a command; the first command goes into the response.
//!
//! Outcome of the command for the application (the AMQP disposition): `accepted` once the
//! waiting request has taken it and confirmed it ([`Confirmation::accepted`]: HTTP at
//! once, as the command goes into the response; CoAP once the device acknowledged a
//! separate response), `released` when the request has already taken another, timed out,
//! is gone (client closed the connection, adapter shutting down) or never confirmed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrule_command_control::{
    BoxFuture, Command, CommandRouter, CommandSink, Notify, Subscription, Target,
};
use ferrule_messaging::Outcome;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// A command handed to the waiting request, with the means to confirm it was taken.
pub(crate) struct Handover {
    command: Command,
    taken: oneshot::Sender<()>,
}

impl Handover {
    pub(crate) fn into_parts(self) -> (Command, Confirmation) {
        (self.command, Confirmation(self.taken))
    }
}

/// Settles the command `accepted`; dropped unused, it is `released`.
pub(crate) struct Confirmation(oneshot::Sender<()>);

impl Confirmation {
    pub(crate) fn accepted(self) {
        let _ = self.0.send(());
    }
}

/// The sink of one waiting request: takes exactly one command.
struct PollSink {
    slot: Mutex<Option<oneshot::Sender<Handover>>>,
}

impl CommandSink for PollSink {
    fn deliver(&self, command: Command) -> BoxFuture<Outcome> {
        let waiting = self.slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        Box::pin(async move {
            let Some(waiting) = waiting else { return Outcome::Released };
            let (taken, confirmed) = oneshot::channel();
            if waiting.send(Handover { command, taken }).is_err() {
                return Outcome::Released;
            }
            // Dropped unread (the request timed out at that moment, or is gone): released.
            match confirmed.await {
                Ok(()) => Outcome::Accepted,
                Err(_) => Outcome::Released,
            }
        })
    }
}

/// A request's subscription for its device's commands, made before its upload is sent:
/// an application that reacts to the upload's `ttd` (or to the `ttd` notification) finds
/// the device subscribed.
pub(crate) struct Waiting {
    rx: oneshot::Receiver<Handover>,
    subscription: Subscription,
    ttd: Duration,
}

/// Subscribes for `device`'s commands for up to `ttd` (deferred commands included: the
/// router hands them over on subscribe; the `ttd` notification goes out now).
pub(crate) fn subscribe(
    router: &CommandRouter,
    adapter: &'static str,
    tenant: &str,
    device: &str,
    ttd: Duration,
) -> Waiting {
    let (tx, rx) = oneshot::channel();
    let sink = Arc::new(PollSink { slot: Mutex::new(Some(tx)) });
    let ttd_seconds = i32::try_from(ttd.as_secs()).unwrap_or(i32::MAX);
    let subscription = router.subscribe(
        tenant,
        Target::Device(device.to_owned()),
        sink,
        Notify { adapter, ttd: ttd_seconds },
    );
    Waiting { rx, subscription, ttd }
}

impl Waiting {
    /// Waits up to the `ttd` for a command. `None`: none came in time, or the adapter is
    /// shutting down. The command stays unsettled until the [`Handover`]'s confirmation
    /// is used or dropped.
    ///
    /// # Cancel safety
    /// Dropping the future (the client went away) drops the subscription; a command being
    /// handed over at that moment is released.
    pub(crate) async fn wait(self, shutdown: &CancellationToken) -> Option<Handover> {
        let Waiting { mut rx, subscription, ttd } = self;
        let handover = tokio::select! {
            handover = &mut rx => handover.ok(),
            _ = tokio::time::sleep(ttd) => None,
            _ = shutdown.cancelled() => None,
        };
        drop(subscription);
        // A command handed over just as the wait ended is still taken rather than released.
        handover.or_else(|| {
            rx.close();
            rx.try_recv().ok()
        })
    }
}
