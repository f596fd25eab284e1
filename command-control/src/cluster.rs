//! Command routing between the instances of a deployment (cluster mode): the interface
//! the platform fills in, and how a command looks when one instance hands it to another.

use std::sync::Arc;

use fe2o3_amqp::types::messaging::MessageAnnotations;
use fe2o3_amqp::types::primitives::{OrderedMap, Symbol, Value};
use ferrule_messaging::{Message, Outcome};
use tokio_util::sync::CancellationToken;

use crate::command::parse;
use crate::request_id::RequestKey;
use crate::router::{BoxFuture, CommandSink, Target};

/// Command routing between the instances of a deployment (cluster mode): which instance
/// holds which subscription, and a way to hand a command or response to another instance.
pub trait CommandCluster: Send + Sync + 'static {
    /// This instance's id.
    fn instance(&self) -> &str;
    /// Records that this instance takes commands for `target` of `tenant` until the
    /// returned guard is dropped.
    fn hold(&self, tenant: &str, target: &Target) -> Box<dyn Send + Sync>;
    /// Instances holding a subscription for `device` itself (the device's own, or a
    /// gateway's for it), the oldest lease first.
    fn device_holders(&self, tenant: &str, device: &str) -> BoxFuture<Vec<String>>;
    /// `(gateway, instance)` of every subscription for all devices of a gateway, the
    /// oldest lease first.
    fn gateway_holders(&self, tenant: &str) -> BoxFuture<Vec<(String, String)>>;
    /// Sends `message` to `address` at `instance`; that instance's outcome (`released`
    /// when it cannot be reached).
    fn send(
        &self,
        instance: &str,
        tenant: &str,
        address: &str,
        message: Message,
    ) -> BoxFuture<Outcome>;
    /// Keeps a command for a device no instance holds until `expires` (ms since the
    /// epoch), where every instance finds it. The outcome: `accepted` once kept.
    fn defer(
        &self,
        tenant: &str,
        device: &str,
        message: Message,
        expires: u64,
    ) -> BoxFuture<Outcome>;
    /// The oldest kept command of `device` that has not expired (expired ones are
    /// dropped), left in place.
    fn next_deferred(&self, tenant: &str, device: &str) -> BoxFuture<Option<Message>>;
    /// Removes the oldest kept command of `device` (once it was delivered).
    fn pop_deferred(&self, tenant: &str, device: &str) -> BoxFuture<()>;
}

/// Message annotation on a command one instance hands to another: the receiving
/// instance delivers it to its own sessions only (no second hop, no deferral).
pub const FORWARDED_ANNOTATION: &str = "x-opt-ferrule-forwarded";

/// A reply id `~INSTANCE/REPLY-ID` names the instance the application's reply address is
/// on (set when a command is handed to another instance; see [`RequestId`]).
pub(crate) const INSTANCE_MARK: char = '~';

/// Whether another instance handed this command over (see [`FORWARDED_ANNOTATION`]).
pub(crate) fn is_forwarded(message: &Message) -> bool {
    message.message_annotations.as_ref().is_some_and(|MessageAnnotations(a)| {
        a.iter().any(|(k, v)| {
            matches!(k, fe2o3_amqp::types::messaging::annotations::OwnedKey::Symbol(s) if s.as_str() == FORWARDED_ANNOTATION)
                && *v == Value::Bool(true)
        })
    })
}

/// The command as it goes to `instance`'s peer: marked as handed over, its reply address
/// naming this instance (`command_response/T/~THIS/REPLY-ID`), so that the device's
/// response comes back here, where the application's reply link is.
pub(crate) fn hand_over(mut message: Message, tenant: &str, this: &str) -> Message {
    let prefix = format!("command_response/{tenant}/");
    if let Some(properties) = message.properties.as_mut() {
        if let Some(reply_id) = properties.reply_to.as_deref().and_then(|r| r.strip_prefix(&prefix))
        {
            if !reply_id.starts_with(INSTANCE_MARK) {
                properties.reply_to = Some(format!("{prefix}{INSTANCE_MARK}{this}/{reply_id}"));
            }
        }
    }
    let annotations =
        message.message_annotations.get_or_insert_with(|| MessageAnnotations(OrderedMap::new()));
    annotations.0.insert(Symbol::from(FORWARDED_ANNOTATION).into(), Value::Bool(true));
    message
}

/// Delivers the commands kept for `device` in cluster mode, oldest first, while its
/// subscription lasts; each is removed once the device took it (a crash in between
/// delivers it again: at least once). One the device does not take stays for next time.
pub(crate) async fn drain_cluster_deferred(
    cluster: Arc<dyn CommandCluster>,
    key: RequestKey,
    tenant: String,
    device: String,
    sink: Arc<dyn CommandSink>,
    cancel: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            next = cluster.next_deferred(&tenant, &device) => next,
        };
        let Some(message) = next else { return };
        let outcome = match parse(&tenant, &message, &key) {
            Ok(parsed) => sink.deliver(parsed.command).await,
            Err(e) => {
                tracing::warn!(%tenant, %device, error = %e, "dropping a kept command that does not parse");
                Outcome::Accepted
            }
        };
        if !outcome.is_accepted() {
            return;
        }
        cluster.pop_deferred(&tenant, &device).await;
    }
}
