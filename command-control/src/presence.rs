//! Where each device was last seen: connected or not (MQTT connections), through which
//! adapter, since when, when it last sent something, and the gateway that last acted for
//! it (Hono's "last known gateway", which command routing prefers). Kept in memory for
//! this instance, fed by the adapters, read by the management API's device state.

use std::collections::{BTreeMap, HashMap};
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
}
