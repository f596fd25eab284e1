//! Message rate limits: token buckets per tenant and per device, over every adapter of
//! an instance (the instance's `[adapters]` rates, or a tenant's own from the registry).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Message rate limits over all adapters of this instance (messages per second; burst: one
/// second's worth). `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimits {
    pub per_device: Option<u32>,
    pub per_tenant: Option<u32>,
}

/// Token buckets per tenant and per device.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    /// This instance's limits, for tenants that set none of their own.
    pub(crate) limits: RateLimits,
    buckets: std::sync::Mutex<RateBuckets>,
}

#[derive(Debug, Default)]
struct RateBuckets {
    tenants: HashMap<String, Bucket>,
    /// tenant → device → bucket (looked up by `&str`: no allocation once a bucket exists).
    devices: HashMap<String, HashMap<String, Bucket>>,
    /// Takes since the last sweep of idle buckets.
    since_sweep: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Refills at `rate` per second (up to `rate`) and takes one token if there is one.
    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Takes a token from `key`'s bucket in `map` (a full one if it has none yet).
fn take_from(map: &mut HashMap<String, Bucket>, key: &str, rate: u32, now: Instant) -> bool {
    if let Some(bucket) = map.get_mut(key) {
        return bucket.take(rate, now);
    }
    let mut bucket = Bucket { tokens: f64::from(rate), at: now };
    let taken = bucket.take(rate, now);
    map.insert(key.to_owned(), bucket);
    taken
}

/// Buckets unused this long are full again: forgotten (memory stays bounded).
const IDLE_BUCKET: Duration = Duration::from_secs(10);

impl Rates {
    /// One message of `device` of `tenant`, under `limits` (the tenant's own, or this
    /// instance's); `Err` names the limit it is over.
    pub(crate) fn take(
        &self,
        tenant: &str,
        device: &str,
        limits: RateLimits,
    ) -> Result<(), &'static str> {
        if limits == RateLimits::default() {
            return Ok(());
        }
        let now = Instant::now();
        let mut b = self.buckets.lock().expect("poisoned");
        b.since_sweep += 1;
        if b.since_sweep >= 4096 {
            b.since_sweep = 0;
            let busy = |bucket: &Bucket| now.saturating_duration_since(bucket.at) < IDLE_BUCKET;
            b.tenants.retain(|_, bucket| busy(bucket));
            b.devices.retain(|_, devices| {
                devices.retain(|_, bucket| busy(bucket));
                !devices.is_empty()
            });
        }
        if let Some(rate) = limits.per_device {
            let taken = match b.devices.get_mut(tenant) {
                Some(devices) => take_from(devices, device, rate, now),
                None => {
                    let mut devices = HashMap::new();
                    let taken = take_from(&mut devices, device, rate, now);
                    b.devices.insert(tenant.to_owned(), devices);
                    taken
                }
            };
            if !taken {
                return Err("device_rate");
            }
        }
        if let Some(rate) = limits.per_tenant {
            if !take_from(&mut b.tenants, tenant, rate, now) {
                return Err("tenant_rate");
            }
        }
        Ok(())
    }
}

impl Rates {
    /// Buckets under `limits` for tenants that set no rates of their own.
    pub(crate) fn new(limits: RateLimits) -> Self {
        Self { limits, buckets: Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_per_device_and_per_tenant() {
        let rates = Rates::default();
        let limits = RateLimits { per_device: Some(2), per_tenant: Some(3) };
        assert_eq!(rates.take("t", "a", limits), Ok(()));
        assert_eq!(rates.take("t", "a", limits), Ok(()));
        assert_eq!(rates.take("t", "a", limits), Err("device_rate"));
        assert_eq!(rates.take("t", "b", limits), Ok(()), "b has its own allowance");
        assert_eq!(rates.take("t", "b", limits), Err("tenant_rate"), "the tenant's 3 are used");
        assert_eq!(rates.take("u", "a", limits), Ok(()), "another tenant");
        assert_eq!(rates.take("t", "b", RateLimits::default()), Ok(()), "no limit");
        let mut bucket = Bucket { tokens: 0.0, at: Instant::now() };
        assert!(bucket.take(10, bucket.at + Duration::from_millis(150)), "refilled 1.5");
        assert!(!bucket.take(10, bucket.at), "0.5 left");
        assert!(bucket.take(10, bucket.at + Duration::from_secs(60)));
        assert!(bucket.tokens <= 9.0, "capped at one second's worth");
    }
}
