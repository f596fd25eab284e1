//! Test support shared by the adapters' integration tests: a device registry held in
//! memory that answers as the real one does (`src/wiring.rs` over the registry's
//! `AuthService`: the same errors for the same cases), and a command router over it;
//! in the submodules, one setup for every adapter (`platform`), the application's side
//! (`amqp`), the device clients (`clients`, `raw_mqtt`).
#![allow(dead_code)] // each test binary uses a different part

pub mod amqp;
pub mod clients;
pub mod platform;
pub mod raw_mqtt;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrule_adapters::{AdapterAccess, AuthError, BoxFuture, DeviceIdentity, DeviceRegistry};

#[derive(Debug, Clone)]
pub struct Device {
    pub enabled: bool,
    pub via: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub enabled: bool,
    pub allow_unauthenticated: bool,
    /// Adapters the tenant switched off (its `adapters` list).
    pub disabled_adapters: Vec<String>,
    /// `resource-limits.max-connections`.
    pub max_connections: Option<u32>,
    pub devices: HashMap<String, Device>,
    /// auth-id → (device-id, password)
    pub passwords: HashMap<String, (String, String)>,
    /// auth-id → (device-id, pre-shared key)
    pub psks: HashMap<String, (String, Vec<u8>)>,
}

impl Tenant {
    /// Whether the tenant switched `adapter` off.
    fn switched_off(&self, adapter: &str) -> bool {
        self.disabled_adapters.iter().any(|a| a == adapter)
    }
}

/// Tenants and devices in memory, changeable while a test runs.
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    tenants: Arc<Mutex<HashMap<String, Tenant>>>,
    /// Added to every `authorize_device` (a registry whose cache missed).
    lookup_delay: Arc<Mutex<std::time::Duration>>,
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn tenant(self, tenant: &str) -> Self {
        self.tenants.lock().unwrap().insert(
            tenant.into(),
            Tenant {
                enabled: true,
                allow_unauthenticated: false,
                disabled_adapters: Vec::new(),
                max_connections: None,
                devices: HashMap::new(),
                passwords: HashMap::new(),
                psks: HashMap::new(),
            },
        );
        self
    }

    pub fn device(self, tenant: &str, device: &str, password: &str) -> Self {
        self.device_via(tenant, device, password, &[])
    }

    pub fn device_via(self, tenant: &str, device: &str, password: &str, via: &[&str]) -> Self {
        {
            let mut tenants = self.tenants.lock().unwrap();
            let t = tenants.get_mut(tenant).expect("tenant first");
            t.devices.insert(
                device.into(),
                Device { enabled: true, via: via.iter().map(|s| s.to_string()).collect() },
            );
            if !password.is_empty() {
                t.passwords.insert(device.into(), (device.into(), password.into()));
            }
        }
        self
    }

    /// Gives `device` (registered before) a `psk` credential with `auth_id`.
    pub fn psk(self, tenant: &str, auth_id: &str, device: &str, key: &[u8]) -> Self {
        self.tenants
            .lock()
            .unwrap()
            .get_mut(tenant)
            .expect("tenant first")
            .psks
            .insert(auth_id.into(), (device.into(), key.to_vec()));
        self
    }

    /// Makes every device look-up take `delay`.
    pub fn set_lookup_delay(&self, delay: std::time::Duration) {
        *self.lookup_delay.lock().unwrap() = delay;
    }

    pub fn set_device_enabled(&self, tenant: &str, device: &str, enabled: bool) {
        self.tenants
            .lock()
            .unwrap()
            .get_mut(tenant)
            .unwrap()
            .devices
            .get_mut(device)
            .unwrap()
            .enabled = enabled;
    }

    pub fn set_tenant_enabled(&self, tenant: &str, enabled: bool) {
        self.tenants.lock().unwrap().get_mut(tenant).unwrap().enabled = enabled;
    }

    /// Switches `adapter` (e.g. `hono-mqtt`) on or off for `tenant`.
    pub fn set_adapter_enabled(&self, tenant: &str, adapter: &str, enabled: bool) {
        let mut tenants = self.tenants.lock().unwrap();
        let disabled = &mut tenants.get_mut(tenant).unwrap().disabled_adapters;
        disabled.retain(|a| a != adapter);
        if !enabled {
            disabled.push(adapter.to_owned());
        }
    }

    pub fn set_allow_unauthenticated(&self, tenant: &str, allow: bool) {
        self.tenants.lock().unwrap().get_mut(tenant).unwrap().allow_unauthenticated = allow;
    }

    pub fn set_max_connections(&self, tenant: &str, max: Option<u32>) {
        self.tenants.lock().unwrap().get_mut(tenant).unwrap().max_connections = max;
    }

    /// Whether `tenant` exists and `holds` for it.
    fn tenant_is(&self, tenant: &str, holds: impl FnOnce(&Tenant) -> bool) -> bool {
        self.tenants.lock().unwrap().get(tenant).is_some_and(holds)
    }

    fn check(&self, tenant: &str, device: &str) -> Result<Device, AuthError> {
        let tenants = self.tenants.lock().unwrap();
        let t = tenants.get(tenant).ok_or(AuthError::UnknownTenant)?;
        if !t.enabled {
            return Err(AuthError::TenantDisabled);
        }
        let d = t.devices.get(device).ok_or(AuthError::UnknownDevice)?;
        if !d.enabled {
            return Err(AuthError::DeviceDisabled);
        }
        Ok(d.clone())
    }
}

impl DeviceRegistry for MemoryRegistry {
    fn authenticate_password<'a>(
        &'a self,
        tenant: &'a str,
        auth_id: &'a str,
        password: &'a [u8],
        _source: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<DeviceIdentity, AuthError>> {
        Box::pin(async move {
            let device_id = {
                let tenants = self.tenants.lock().unwrap();
                let t = tenants.get(tenant).ok_or(AuthError::UnknownTenant)?;
                let (device_id, expected) =
                    t.passwords.get(auth_id).ok_or(AuthError::BadCredentials)?;
                if expected.as_bytes() != password {
                    return Err(AuthError::BadCredentials);
                }
                device_id.clone()
            };
            self.check(tenant, &device_id)?;
            Ok(DeviceIdentity { tenant: tenant.into(), device_id, auth_id: auth_id.into() })
        })
    }

    fn authorize_device<'a>(
        &'a self,
        tenant: &'a str,
        device_id: &'a str,
        gateway: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        Box::pin(async move {
            let delay = *self.lookup_delay.lock().unwrap();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let device = self.check(tenant, device_id)?;
            match gateway.filter(|gw| *gw != device_id) {
                // As the registry: the gateway must exist, be enabled and be in `via`.
                Some(gw) => {
                    let gateway_ok = self.check(tenant, gw).is_ok();
                    if gateway_ok && device.via.iter().any(|v| v == gw) {
                        Ok(())
                    } else {
                        Err(AuthError::GatewayNotAuthorized)
                    }
                }
                None => Ok(()),
            }
        })
    }

    fn adapter_access<'a>(
        &'a self,
        tenant: &'a str,
        adapter: &'a str,
    ) -> BoxFuture<'a, Result<AdapterAccess, AuthError>> {
        // As the registry: an unknown tenant allows nothing.
        let tenants = self.tenants.lock().unwrap();
        let access = tenants.get(tenant).map_or(AdapterAccess::default(), |t| AdapterAccess {
            enabled: !t.switched_off(adapter),
            unauthenticated: t.enabled && t.allow_unauthenticated && !t.switched_off(adapter),
            limits: ferrule_adapters::TenantLimits {
                max_connections: t.max_connections,
                ..Default::default()
            },
            defaults: None,
        });
        Box::pin(async move { Ok(access) })
    }

    fn psk<'a>(
        &'a self,
        tenant: &'a str,
        auth_id: &'a str,
    ) -> BoxFuture<'a, Result<(DeviceIdentity, Vec<u8>), AuthError>> {
        Box::pin(async move {
            let (device_id, key) = {
                let tenants = self.tenants.lock().unwrap();
                let t = tenants.get(tenant).ok_or(AuthError::UnknownTenant)?;
                t.psks.get(auth_id).cloned().ok_or(AuthError::BadCredentials)?
            };
            self.check(tenant, &device_id)?;
            Ok((DeviceIdentity { tenant: tenant.into(), device_id, auth_id: auth_id.into() }, key))
        })
    }
}

/// The command router asks the registry whether a gateway may act for a device.
impl ferrule_command_control::DeviceCheck for MemoryRegistry {
    fn gateway_may_act_for(
        &self,
        tenant: &str,
        device: &str,
        gateway: &str,
    ) -> ferrule_command_control::BoxFuture<bool> {
        let (registry, tenant, device, gateway) =
            (self.clone(), tenant.to_owned(), device.to_owned(), gateway.to_owned());
        Box::pin(async move {
            registry.authorize_device(&tenant, &device, Some(&gateway)).await.is_ok()
        })
    }

    fn may_receive_commands(
        &self,
        tenant: &str,
        device: &str,
    ) -> ferrule_command_control::BoxFuture<Option<bool>> {
        let (registry, tenant, device) = (self.clone(), tenant.to_owned(), device.to_owned());
        Box::pin(
            async move { Some(registry.authorize_device(&tenant, &device, None).await.is_ok()) },
        )
    }
}

/// The request-id key of the test routers (fixed, so a test can seal an id itself).
pub fn request_key() -> ferrule_command_control::RequestKey {
    ferrule_command_control::RequestKey::new(&[42; 32]).expect("32 bytes")
}

/// An in-memory broker with command & control's addresses, and a command router over it
/// (installed, keyed with [`request_key`]) that checks gateways against `registry`.
pub fn broker_with_commands(
    registry: &MemoryRegistry,
) -> (ferrule_messaging::Broker, ferrule_command_control::CommandRouter) {
    let config = ferrule_command_control::messaging_config(Default::default());
    let broker = ferrule_messaging::Broker::in_memory(&config);
    let router = ferrule_command_control::CommandRouter::new(
        broker.clone(),
        Arc::new(registry.clone()),
        request_key(),
    );
    router.install();
    (broker, router)
}
