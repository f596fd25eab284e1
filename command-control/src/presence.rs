//! Where each device was last seen: connected or not (MQTT connections), through which
//! adapter, since when, when it last sent something, and the gateway that last acted for
//! it (Hono's "last known gateway", which command routing prefers). Kept in memory for
//! this instance, fed by the adapters, read by the management API's device state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

/// One device's state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceState {
    /// Open connections (MQTT).
    pub connections: u32,
    /// The adapter it last used.
    pub adapter: &'static str,
    /// Since when it is connected (ms since the epoch; `None` while not connected).
    pub connected_since: Option<u64>,
    /// When it last connected, sent a message or disconnected (ms since the epoch).
    pub last_seen: u64,
    /// The gateway that last acted for it (`None`: it acted itself, or nobody yet).
    pub last_gateway: Option<String>,
}

/// The states of every device this instance has seen (bounded by the registry's devices:
/// only authenticated devices and gateways' registered devices get here).
#[derive(Debug, Default)]
pub struct Presence {
    tenants: Mutex<HashMap<String, BTreeMap<String, DeviceState>>>,
    /// (tenant, device) → its latest deferred commands, oldest first.
    deferred: Mutex<HashMap<(String, String), VecDeque<DeferredCommand>>>,
}

/// Deferred commands remembered per device (older ones are forgotten).
pub const DEFERRED_HISTORY: usize = 64;

/// A command stored for a device that was not connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredCommand {
    /// The application's message id (or correlation id).
    pub id: String,
    /// The command name.
    pub name: String,
    /// When it was stored, and when it expires (ms since the epoch).
    pub queued_at: u64,
    pub expires_at: u64,
    pub status: DeferredStatus,
}

/// What became of a deferred command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferredStatus {
    /// Stored, waiting for the device.
    Queued,
    /// The device took it.
    Delivered,
    /// Its time to live ran out before the device came.
    Expired,
    /// An operator deleted it.
    Deleted,
}

impl DeferredStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeferredStatus::Queued => "queued",
            DeferredStatus::Delivered => "delivered",
            DeferredStatus::Expired => "expired",
            DeferredStatus::Deleted => "deleted",
        }
    }
}

fn now_ms() -> u64 {
    ferrule_messaging::message::now_millis()
}

impl Presence {
    fn with<R>(&self, tenant: &str, device: &str, f: impl FnOnce(&mut DeviceState) -> R) -> R {
        let mut tenants = self.tenants.lock().expect("poisoned");
        let devices = match tenants.get_mut(tenant) {
            Some(devices) => devices,
            None => tenants.entry(tenant.to_owned()).or_default(),
        };
        let state = match devices.get_mut(device) {
            Some(state) => state,
            None => devices.entry(device.to_owned()).or_default(),
        };
        f(state)
    }

    /// A connection of `device` opened on `adapter`.
    pub fn connected(&self, tenant: &str, device: &str, adapter: &'static str) {
        let now = now_ms();
        self.with(tenant, device, |s| {
            s.connections += 1;
            s.adapter = adapter;
            s.connected_since.get_or_insert(now);
            s.last_seen = now;
        });
    }

    /// A connection of `device` closed.
    pub fn disconnected(&self, tenant: &str, device: &str) {
        let now = now_ms();
        self.with(tenant, device, |s| {
            s.connections = s.connections.saturating_sub(1);
            if s.connections == 0 {
                s.connected_since = None;
            }
            s.last_seen = now;
        });
    }

    /// `device` sent something on `adapter`, itself (`gateway` `None`) or through `gateway`.
    pub fn seen(&self, tenant: &str, device: &str, adapter: &'static str, gateway: Option<&str>) {
        let now = now_ms();
        self.with(tenant, device, |s| {
            s.adapter = adapter;
            s.last_seen = now;
            match gateway {
                Some(g) if s.last_gateway.as_deref() != Some(g) => s.last_gateway = Some(g.into()),
                Some(_) => {}
                None => s.last_gateway = None,
            }
        });
    }

    /// The gateway that last acted for `device`.
    pub fn last_gateway(&self, tenant: &str, device: &str) -> Option<String> {
        let tenants = self.tenants.lock().expect("poisoned");
        tenants.get(tenant)?.get(device)?.last_gateway.clone()
    }

    /// `device`'s state, if it was seen.
    pub fn get(&self, tenant: &str, device: &str) -> Option<DeviceState> {
        self.tenants.lock().expect("poisoned").get(tenant)?.get(device).cloned()
    }

    /// A command was stored for `device` until `expires_at`.
    pub fn deferred(&self, tenant: &str, device: &str, id: &str, name: &str, expires_at: u64) {
        let mut deferred = self.deferred.lock().expect("poisoned");
        let list = deferred.entry((tenant.to_owned(), device.to_owned())).or_default();
        if list.len() >= DEFERRED_HISTORY {
            list.pop_front();
        }
        list.push_back(DeferredCommand {
            id: id.to_owned(),
            name: name.to_owned(),
            queued_at: now_ms(),
            expires_at,
            status: DeferredStatus::Queued,
        });
    }

    /// The deferred command `id` of `device` was delivered.
    pub fn deferred_delivered(&self, tenant: &str, device: &str, id: &str) {
        self.mark(tenant, device, |c| c.id == id, DeferredStatus::Delivered);
    }

    /// Every command still queued for `device` was deleted.
    pub fn deferred_deleted(&self, tenant: &str, device: &str) {
        self.mark(tenant, device, |_| true, DeferredStatus::Deleted);
    }

    fn mark(
        &self,
        tenant: &str,
        device: &str,
        which: impl Fn(&DeferredCommand) -> bool,
        status: DeferredStatus,
    ) {
        let now = now_ms();
        let mut deferred = self.deferred.lock().expect("poisoned");
        let key = (tenant.to_owned(), device.to_owned());
        for c in deferred.get_mut(&key).into_iter().flatten() {
            if c.status == DeferredStatus::Queued && c.expires_at > now && which(c) {
                c.status = status;
            }
        }
    }

    /// `device`'s latest deferred commands, oldest first (queued ones past their expiry
    /// show as expired).
    pub fn deferred_commands(&self, tenant: &str, device: &str) -> Vec<DeferredCommand> {
        let now = now_ms();
        let deferred = self.deferred.lock().expect("poisoned");
        let key = (tenant.to_owned(), device.to_owned());
        let list = deferred.get(&key).into_iter().flatten().cloned();
        list.map(|mut c| {
            if c.status == DeferredStatus::Queued && c.expires_at <= now {
                c.status = DeferredStatus::Expired;
            }
            c
        })
        .collect()
    }

    /// A page of `tenant`'s devices (by id), only the connected ones (or only the others)
    /// with `connected`; and how many there are in all.
    pub fn page(
        &self,
        tenant: &str,
        offset: usize,
        size: usize,
        connected: Option<bool>,
    ) -> (usize, Vec<(String, DeviceState)>) {
        let tenants = self.tenants.lock().expect("poisoned");
        let Some(devices) = tenants.get(tenant) else { return (0, Vec::new()) };
        let matching =
            devices.iter().filter(|(_, s)| connected.is_none_or(|c| (s.connections > 0) == c));
        let total = matching.clone().count();
        let page = matching.skip(offset).take(size).map(|(d, s)| (d.clone(), s.clone())).collect();
        (total, page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_last_seen_and_gateways() {
        let p = Presence::default();
        p.connected("t", "d1", "hono-mqtt");
        p.connected("t", "d1", "hono-mqtt");
        let s = p.get("t", "d1").unwrap();
        assert_eq!((s.connections, s.adapter), (2, "hono-mqtt"));
        let since = s.connected_since.unwrap();
        p.disconnected("t", "d1");
        assert_eq!(p.get("t", "d1").unwrap().connected_since, Some(since), "one still open");
        p.disconnected("t", "d1");
        assert_eq!(p.get("t", "d1").unwrap().connected_since, None);
        p.seen("t", "d2", "hono-http", Some("gw"));
        assert_eq!(p.last_gateway("t", "d2").as_deref(), Some("gw"));
        p.seen("t", "d2", "hono-coap", None);
        assert_eq!(p.last_gateway("t", "d2"), None, "it acted itself since");
        p.connected("t", "d3", "hono-mqtt");
        assert_eq!(p.page("t", 0, 10, Some(true)).0, 1);
        let (total, page) = p.page("t", 1, 1, None);
        assert_eq!((total, page[0].0.as_str()), (3, "d2"));
        assert_eq!(p.page("other", 0, 10, None), (0, Vec::new()));
    }

    #[test]
    fn deferred_command_lifecycle() {
        let p = Presence::default();
        let later = now_ms() + 60_000;
        p.deferred("t", "d", "c1", "reboot", later);
        p.deferred("t", "d", "c2", "ping", later);
        p.deferred("t", "d", "c3", "old", now_ms() - 1);
        p.deferred_delivered("t", "d", "c1");
        let status = |p: &Presence| -> Vec<&'static str> {
            p.deferred_commands("t", "d").iter().map(|c| c.status.as_str()).collect()
        };
        assert_eq!(status(&p), ["delivered", "queued", "expired"]);
        p.deferred_deleted("t", "d");
        assert_eq!(status(&p), ["delivered", "deleted", "expired"]);
        for i in 0..DEFERRED_HISTORY {
            p.deferred("t", "d", &format!("n{i}"), "x", later);
        }
        assert_eq!(p.deferred_commands("t", "d").len(), DEFERRED_HISTORY, "bounded");
    }
}
