//! A tenant's usage per accounting period (Hono's `resource-limits`: `data-volume` and
//! `connection-duration`), counted in this process: exact for one instance, no metrics
//! server in between (Hono asks Prometheus). Counts start again when the process does.

use std::collections::HashMap;
use std::sync::Mutex;

use std::time::Duration;

use chrono::Utc;

use crate::downstream::{Endpoint, Qos};

pub use ferrule_net::usage::UsageLimit;

/// A tenant's limits that the adapters enforce (from its `resource-limits` and
/// `minimum-message-size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantLimits {
    /// Connections its devices may hold open on a connection-oriented adapter.
    pub max_connections: Option<u32>,
    /// Payload bytes its devices may send per period.
    pub data_volume: Option<UsageLimit>,
    /// Seconds its devices may be connected per period (all connections together).
    pub connection_duration: Option<UsageLimit>,
    /// Payloads count as a multiple of this (Hono's `minimum-message-size`); 0: as they are.
    pub minimum_message_size: u32,
    /// Messages per second all its devices may send together, and each device (its
    /// `resource-limits.ext`; `None`: the instance's `[adapters]` rates).
    pub rate_per_tenant: Option<u32>,
    pub rate_per_device: Option<u32>,
    /// Longest time to live of an event (seconds; `resource-limits.max-ttl`), and of
    /// telemetry at QoS 0 and 1 (`max-ttl-telemetry-qos0`, `-qos1`): longer ones are cut to
    /// it, and a message without one gets it.
    pub max_ttl: Option<u32>,
    pub max_ttl_telemetry_qos0: Option<u32>,
    pub max_ttl_telemetry_qos1: Option<u32>,
    /// Longest `hono-ttd` a device may ask for (seconds; the adapter's `ext.max-ttd`).
    pub max_ttd: Option<u32>,
    /// How the tenant's messages are traced (its `tracing.sampling-mode`).
    pub trace_sampling: ferrule_net::trace::Sampling,
}

/// What a tenant's `defaults` put into its devices' messages (Hono): a message without a
/// time to live or content type gets the default's, and every other default becomes an
/// application property unless the device set it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageDefaults {
    pub ttl: Option<std::time::Duration>,
    pub content_type: Option<String>,
    pub properties: Vec<(String, String)>,
}

impl TenantLimits {
    /// `ttd` cut to the tenant's `max-ttd`.
    pub fn clamp_ttd(&self, ttd: std::time::Duration) -> std::time::Duration {
        self.max_ttd.map_or(ttd, |max| ttd.min(std::time::Duration::from_secs(max.into())))
    }
}

impl TenantLimits {
    /// What a payload of `len` bytes counts against the data volume.
    pub fn charged_size(&self, len: usize) -> u64 {
        let len = len as u64;
        match u64::from(self.minimum_message_size) {
            0 => len,
            min => len.div_ceil(min).max(1) * min,
        }
    }
}

impl crate::downstream::Upload {
    /// Applies the tenant's `defaults` and its longest time to live (Hono's rules).
    pub(crate) fn apply_tenant_terms(&mut self) {
        if let Some(defaults) = self.defaults.take() {
            self.ttl = self.ttl.or(defaults.ttl);
            if self.content_type.is_none() {
                self.content_type.clone_from(&defaults.content_type);
            }
            for (key, value) in &defaults.properties {
                if !self.properties.iter().any(|(k, _)| k == key) {
                    self.properties.push((key.clone(), value.clone()));
                }
            }
        }
        let max = match (self.endpoint, self.qos) {
            (Endpoint::Event, _) => self.limits.max_ttl,
            (Endpoint::Telemetry, Qos::AtMostOnce) => self.limits.max_ttl_telemetry_qos0,
            (Endpoint::Telemetry, Qos::AtLeastOnce) => self.limits.max_ttl_telemetry_qos1,
        };
        if let Some(max) = max.map(|secs| Duration::from_secs(secs.into())) {
            self.ttl = Some(self.ttl.map_or(max, |ttl| ttl.min(max)));
        }
    }
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    Utc::now().timestamp()
}

/// An amount used within one period.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Used {
    pub(crate) period: i64,
    pub(crate) amount: u64,
}

impl Used {
    /// The amount used in the period starting at `period` (0 if this count is older).
    pub(crate) fn in_period(&self, period: i64) -> u64 {
        if self.period == period {
            self.amount
        } else {
            0
        }
    }

    pub(crate) fn add(&mut self, period: i64, amount: u64) {
        if self.period != period {
            *self = Used { period, amount: 0 };
        }
        self.amount = self.amount.saturating_add(amount);
    }
}

/// The data volume each tenant with a limit used in its current period.
#[derive(Debug, Default)]
pub struct Volumes {
    tenants: Mutex<HashMap<String, Used>>,
}

impl Volumes {
    /// Counts `amount` bytes for `tenant` if they fit in its period's volume; `false`
    /// (nothing counted) if they do not.
    pub fn charge(&self, tenant: &str, limit: &UsageLimit, amount: u64, now: i64) -> bool {
        let Some(period) = limit.period_start(now) else { return true };
        let mut tenants = self.tenants.lock().expect("poisoned");
        let used = tenants.get(tenant).map_or(0, |u| u.in_period(period));
        if used.saturating_add(amount) > limit.max {
            return false;
        }
        match tenants.get_mut(tenant) {
            Some(entry) => entry.add(period, amount),
            None => {
                tenants.insert(tenant.to_owned(), Used { period, amount });
            }
        }
        true
    }

    /// Gives back what [`Volumes::charge`] counted for a message that was not taken.
    pub fn refund(&self, tenant: &str, limit: &UsageLimit, amount: u64, now: i64) {
        let Some(period) = limit.period_start(now) else { return };
        let mut tenants = self.tenants.lock().expect("poisoned");
        if let Some(used) = tenants.get_mut(tenant).filter(|u| u.period == period) {
            used.amount = used.amount.saturating_sub(amount);
        }
    }

    /// Whether `tenant` used up its period's volume (its devices may not connect).
    pub fn exhausted(&self, tenant: &str, limit: &UsageLimit, now: i64) -> bool {
        let Some(period) = limit.period_start(now) else { return false };
        let tenants = self.tenants.lock().expect("poisoned");
        tenants.get(tenant).map_or(0, |u| u.in_period(period)) >= limit.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(text).expect("valid").timestamp()
    }

    #[test]
    fn periods() {
        let monthly =
            UsageLimit { effective_since: at("2026-03-10T12:00:00Z"), max: 1, period_days: None };
        assert_eq!(monthly.period_start(at("2026-03-01T00:00:00Z")), None, "not yet in effect");
        assert_eq!(
            monthly.period_start(at("2026-03-20T00:00:00Z")),
            Some(at("2026-03-10T12:00:00Z"))
        );
        assert_eq!(
            monthly.period_start(at("2026-04-01T00:00:00Z")),
            Some(at("2026-04-01T00:00:00Z"))
        );
        assert_eq!(
            monthly.period_start(at("2027-02-28T23:59:59Z")),
            Some(at("2027-02-01T00:00:00Z"))
        );
        let weekly = UsageLimit {
            effective_since: at("2026-03-10T12:00:00Z"),
            max: 1,
            period_days: Some(7),
        };
        assert_eq!(
            weekly.period_start(at("2026-03-17T11:59:59Z")),
            Some(at("2026-03-10T12:00:00Z"))
        );
        assert_eq!(
            weekly.period_start(at("2026-03-17T12:00:00Z")),
            Some(at("2026-03-17T12:00:00Z"))
        );
    }

    #[test]
    fn minimum_message_size_rounds_up() {
        let limits = TenantLimits { minimum_message_size: 4096, ..Default::default() };
        assert_eq!(limits.charged_size(0), 4096);
        assert_eq!(limits.charged_size(1), 4096);
        assert_eq!(limits.charged_size(4097), 8192);
        assert_eq!(TenantLimits::default().charged_size(10), 10);
    }

    #[test]
    fn volumes_per_tenant_and_period() {
        let limit = UsageLimit { effective_since: 0, max: 100, period_days: Some(1) };
        let volumes = Volumes::default();
        assert!(volumes.charge("a", &limit, 60, 10));
        assert!(!volumes.charge("a", &limit, 41, 20), "over the volume");
        assert!(volumes.charge("a", &limit, 40, 20));
        assert!(volumes.exhausted("a", &limit, 30));
        assert!(volumes.charge("b", &limit, 100, 30), "another tenant counts its own");
        volumes.refund("a", &limit, 40, 40);
        assert!(!volumes.exhausted("a", &limit, 40));
        assert!(volumes.charge("a", &limit, 100, 86_400), "a new period starts from zero");
    }
}
