//! Last Will as a device message (Ferrule's extension; Hono accepts a Will and ignores
//! it): when a device's connection ends without DISCONNECT, its Will is published as the
//! telemetry or event its topic names (Hono's topic forms, e.g. `event` or
//! `telemetry/TENANT/DEVICE`), with the device's identity, after the MQTT 5 Will delay.
//! A clean DISCONNECT (MQTT 5: any reason but 0x04 "with Will") discards it; the same
//! device connecting again within the delay cancels it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::config::ADAPTER;
use super::connection::Shared;
use super::mapping;
use super::session::Session;
use crate::door::{self, Standing};
use crate::downstream::{Endpoint, Qos, Upload};

/// A Will from CONNECT.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) retain: bool,
    /// MQTT 5 Will delay.
    pub(crate) delay: Duration,
    pub(crate) content_type: Option<String>,
    /// MQTT 5 message expiry.
    pub(crate) expiry: Option<Duration>,
}

/// Longest Will delay honoured (a Will waiting longer is published then).
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// Wills waiting for their delay, per tenant and device: the device connecting again
/// cancels its own.
#[derive(Debug, Default)]
pub(crate) struct PendingWills {
    waiting: Mutex<HashMap<(String, String), (u64, CancellationToken)>>,
    next_id: AtomicU64,
}

impl PendingWills {
    /// The device is back: its waiting Will (if any) is not published.
    pub(crate) fn cancel(&self, tenant: &str, device: &str) {
        let key = (tenant.to_owned(), device.to_owned());
        if let Some((_, token)) = self.waiting.lock().expect("poisoned").remove(&key) {
            token.cancel();
        }
    }

    /// Registers a Will that waits (replacing, and cancelling, an older one of the device).
    fn wait(&self, tenant: &str, device: &str) -> (u64, CancellationToken) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let key = (tenant.to_owned(), device.to_owned());
        let old = self.waiting.lock().expect("poisoned").insert(key, (id, token.clone()));
        if let Some((_, old)) = old {
            old.cancel();
        }
        (id, token)
    }

    /// The Will `id` waited its time: forgotten (unless a newer one replaced it).
    fn done(&self, tenant: &str, device: &str, id: u64) {
        let key = (tenant.to_owned(), device.to_owned());
        let mut waiting = self.waiting.lock().expect("poisoned");
        if waiting.get(&key).is_some_and(|(current, _)| *current == id) {
            waiting.remove(&key);
        }
    }
}

/// Publishes `session`'s Will, if it has one, once its delay is over (the connection
/// ended without DISCONNECT). Runs on the connection's worker.
pub(super) fn publish(shared: &Arc<Shared>, session: &Session) {
    let Some(will) = session.take_will() else { return };
    let counted = |outcome: &'static str| {
        metrics::counter!("ferrule_mqtt_wills_total", "outcome" => outcome).increment(1);
    };
    let Ok(address) = mapping::parse_publish_topic(&will.topic) else {
        tracing::debug!(client_id = %session.client_id, topic = %will.topic, "Will topic is not a telemetry or event topic; not published");
        return counted("invalid");
    };
    let Ok(target) = session.target(&address) else {
        return counted("invalid");
    };
    let (tenant, device) = (target.tenant().to_owned(), target.device().to_owned());
    let (id, token) = shared.wills.wait(&tenant, &device);
    let shared = shared.clone();
    let client_id = session.client_id.clone();
    ntex_rt::spawn(async move {
        tokio::select! {
            _ = token.cancelled() => return counted("cancelled"),
            _ = tokio::time::sleep(will.delay.min(MAX_DELAY)) => {}
        }
        shared.wills.done(&tenant, &device, id);
        // The registry is asked again: a device disabled meanwhile has no Will published.
        let access = door::authorize(shared.registry.as_ref(), ADAPTER, &target, Standing::Session);
        let Ok(access) = access.await else { return counted("refused") };
        let properties = &address.properties;
        let upload = Upload {
            tenant,
            device_id: device,
            endpoint: address.endpoint,
            // An event is at least once in Hono; telemetry as the Will asked.
            qos: Qos::AtLeastOnce,
            payload: will.payload,
            content_type: properties.content_type.clone().or(will.content_type),
            ttl: match address.endpoint {
                Endpoint::Event => properties.ttl.or(will.expiry),
                Endpoint::Telemetry => will.expiry,
            },
            orig_adapter: ADAPTER,
            orig_address: will.topic,
            properties: properties.other.clone(),
            limits: access.limits,
            retain: will.retain,
            defaults: access.defaults,
            ttd: None,
            gateway: match &target {
                crate::door::Target::ViaGateway { gateway, .. } => Some(gateway.clone()),
                _ => None,
            },
            lookup_ns: None,
        };
        match shared.downstream.send(upload).await {
            Ok(()) => counted("published"),
            Err(e) => {
                tracing::debug!(%client_id, error = %e, "Will not delivered");
                counted("refused")
            }
        }
    });
}
