//! Commands to a connected device: the router's [`CommandSink`] for an MQTT session, and
//! the session's outbox that publishes them and reports the outcome.
//!
//! The router calls [`CommandSink::deliver`] on any thread, but ntex's `MqttSink` is
//! `Rc`-based and lives on the connection's worker thread; commands therefore cross into
//! the session through a bounded channel ([`OUTBOX_CAPACITY`]), and the outbox task on
//! the worker thread publishes them, at most [`MAX_IN_FLIGHT`] at a time.
//!
//! Outcome (the AMQP disposition the application sees): QoS 0 subscription → `accepted`
//! once written; QoS 1 → `accepted` after the device's PUBACK (MQTT 5: with a success
//! reason code), `released` if it does not come within `command_ack_timeout`, if the
//! outbox stays full that long, or if the connection is gone; `rejected` if the command
//! name cannot be a topic level (`+`, `#`).

use std::sync::Arc;
use std::time::Duration;

use ferrule_command_control::{BoxFuture, Command, CommandSink};
use ferrule_messaging::message::condition;
use ferrule_messaging::Outcome;
use ntex_mqtt::{v3, v5};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use super::mapping::{self, CommandFilter};

/// Commands waiting to be published per session; further `deliver` calls wait (at most
/// `command_ack_timeout`, then the command is released).
pub const OUTBOX_CAPACITY: usize = 32;
/// Commands published but not yet acknowledged per session.
pub const MAX_IN_FLIGHT: usize = 32;

/// Where a session's commands are written: the ntex sink of its protocol version.
#[derive(Clone)]
pub(super) enum Outbound {
    V3(v3::MqttSink),
    V5(v5::MqttSink),
}

/// One command on its way into a session.
struct Pending {
    command: Command,
    form: Arc<CommandFilter>,
    at_least_once: bool,
    done: oneshot::Sender<Outcome>,
}

/// A session's outbox: the sending half of its channel; dropping it (the connection
/// ended) stops the outbox task, and queued commands are released.
pub(super) struct Outbox {
    tx: mpsc::Sender<Pending>,
    stop: CancellationToken,
    ack_timeout: Duration,
}

impl Outbox {
    /// Starts the outbox task on the current (ntex worker) thread.
    pub fn start(outbound: Outbound, ack_timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY);
        let stop = CancellationToken::new();
        ntex_rt::spawn(run(rx, outbound, stop.clone(), ack_timeout));
        Outbox { tx, stop, ack_timeout }
    }

    /// The sink registered with the router for one subscription (`form` decides the
    /// topic spelling; `at_least_once` is the granted QoS 1).
    pub fn sink(&self, form: CommandFilter, at_least_once: bool) -> Arc<dyn CommandSink> {
        Arc::new(SessionSink {
            tx: self.tx.clone(),
            form: Arc::new(form),
            at_least_once,
            ack_timeout: self.ack_timeout,
        })
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct SessionSink {
    tx: mpsc::Sender<Pending>,
    form: Arc<CommandFilter>,
    at_least_once: bool,
    ack_timeout: Duration,
}

impl CommandSink for SessionSink {
    fn deliver(&self, command: Command) -> BoxFuture<Outcome> {
        if !mapping::valid_command_name(&command.name) {
            let description =
                format!("command name {:?} cannot be an MQTT topic level", command.name);
            return Box::pin(
                async move { Outcome::rejected(condition::INVALID_FIELD, description) },
            );
        }
        let tx = self.tx.clone();
        let (done, outcome) = oneshot::channel();
        let pending =
            Pending { command, form: self.form.clone(), at_least_once: self.at_least_once, done };
        let ack_timeout = self.ack_timeout;
        Box::pin(async move {
            // A full outbox for that long means the device is not keeping up: released.
            match tokio::time::timeout(ack_timeout, tx.send(pending)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Outcome::Released,
            }
            // The outbox always answers, or drops `done` when the connection ends.
            outcome.await.unwrap_or(Outcome::Released)
        })
    }
}

/// The outbox task: takes commands in order, publishes each in its own task once an
/// in-flight slot is free, until the connection ends.
///
/// Runs on the ntex worker thread that owns `outbound`.
async fn run(
    mut rx: mpsc::Receiver<Pending>,
    outbound: Outbound,
    stop: CancellationToken,
    ack_timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let pending = tokio::select! {
            _ = stop.cancelled() => break,
            pending = rx.recv() => match pending { Some(p) => p, None => break },
        };
        let slot = tokio::select! {
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot { Ok(slot) => slot, Err(_) => break },
        };
        let outbound = outbound.clone();
        ntex_rt::spawn(async move {
            let outcome = publish(&outbound, &pending, ack_timeout).await;
            let _ = pending.done.send(outcome);
            drop(slot);
        });
    }
    // Dropping `rx` drops the queued commands' `done`: their sinks answer released.
}

/// Publishes one command and waits for its acknowledgement (QoS 1).
///
/// # Cancel safety
/// Not relevant: it runs to completion in its own task. A QoS 1 publish abandoned on the
/// timeout stays in ntex's in-flight window until the device acknowledges it (ntex
/// expects PUBACKs in order).
async fn publish(outbound: &Outbound, pending: &Pending, ack_timeout: Duration) -> Outcome {
    let command = &pending.command;
    let topic = pending.form.command_topic(
        &command.tenant,
        &command.device_id,
        command.request_id.as_deref(),
        &command.name,
    );
    // ntex and the messaging core use different `Bytes` types: one copy here.
    let payload = ntex_bytes::Bytes::copy_from_slice(&command.payload);
    let delivered = match outbound {
        Outbound::V3(sink) => {
            let publish = sink.publish(topic);
            if pending.at_least_once {
                matches!(
                    tokio::time::timeout(ack_timeout, publish.send_at_least_once(payload)).await,
                    Ok(Ok(()))
                )
            } else {
                publish.send_at_most_once(payload).is_ok()
            }
        }
        Outbound::V5(sink) => {
            let content_type = command.content_type.clone();
            let publish =
                sink.publish(topic).properties(|p| p.content_type = content_type.map(Into::into));
            if pending.at_least_once {
                match tokio::time::timeout(ack_timeout, publish.send_at_least_once(payload)).await {
                    Ok(Ok(ack)) => u8::from(ack.reason_code) < 0x80,
                    _ => false,
                }
            } else {
                publish.send_at_most_once(payload).is_ok()
            }
        }
    };
    if delivered {
        Outcome::Accepted
    } else {
        tracing::debug!(tenant = %command.tenant, device = %command.device_id, name = %command.name, "command not acknowledged");
        Outcome::Released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::mapping::parse_command_filter;

    fn sink(tx: mpsc::Sender<Pending>, ack_timeout: Duration) -> SessionSink {
        let form = Arc::new(parse_command_filter("command///req/#").expect("valid"));
        SessionSink { tx, form, at_least_once: true, ack_timeout }
    }

    fn command(name: &str) -> Command {
        Command {
            tenant: "t1".into(),
            device_id: "d1".into(),
            name: name.into(),
            payload: "on".into(),
            content_type: None,
            request_id: Some("R".into()),
        }
    }

    #[tokio::test]
    async fn outcome_comes_from_the_session() {
        let (tx, mut rx) = mpsc::channel(1);
        let delivering = tokio::spawn(sink(tx, Duration::from_secs(5)).deliver(command("light")));
        let pending = rx.recv().await.expect("handed to the session");
        assert_eq!((pending.command.name.as_str(), pending.at_least_once), ("light", true));
        pending.done.send(Outcome::Accepted).unwrap();
        assert_eq!(delivering.await.unwrap(), Outcome::Accepted);
    }

    #[tokio::test]
    async fn released_when_the_session_is_gone_or_full() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        assert_eq!(
            sink(tx, Duration::from_secs(5)).deliver(command("light")).await,
            Outcome::Released,
            "gone"
        );

        let (tx, mut rx) = mpsc::channel(1);
        let s = sink(tx, Duration::from_millis(50));
        let first = tokio::spawn(s.deliver(command("a")));
        let taken = rx.recv().await.expect("handed to the session");
        // The outbox stays full: the next command waits for room, then gives up.
        let (done, _outcome) = oneshot::channel();
        let filler =
            Pending { command: command("x"), form: s.form.clone(), at_least_once: true, done };
        s.tx.try_send(filler).map_err(|_| "room for one").unwrap();
        assert_eq!(s.deliver(command("b")).await, Outcome::Released, "full");
        // The session took the first but dropped it (connection ended): released.
        drop(taken);
        assert_eq!(first.await.unwrap(), Outcome::Released);
    }

    #[tokio::test]
    async fn wildcards_in_the_name_are_rejected() {
        let (tx, _rx) = mpsc::channel(1);
        assert!(matches!(
            sink(tx, Duration::from_secs(5)).deliver(command("a/#")).await,
            Outcome::Rejected { .. }
        ));
    }
}
