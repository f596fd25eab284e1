//! Glue between components: the device registry's authentication service seen through the
//! adapters' [`DeviceRegistry`] trait and the command router's [`DeviceCheck`].

use ferrule_adapters::{
    AdapterAccess, AuthError, BoxFuture, CredentialKind, DeviceIdentity, DeviceRegistry,
    TenantLimits,
};
use ferrule_command_control::DeviceCheck;
use ferrule_device_registry::model::SamplingMode;
use ferrule_device_registry::{AuthError as RegistryAuthError, AuthService, CredentialType};
use ferrule_net::trace::Sampling;

/// The registry's [`AuthService`] as the adapters and the command router need it.
#[derive(Clone)]
pub struct RegistryDevices(pub AuthService);

fn map(e: RegistryAuthError) -> AuthError {
    match e {
        RegistryAuthError::BadCredentials => AuthError::BadCredentials,
        RegistryAuthError::TenantDisabled => AuthError::TenantDisabled,
        RegistryAuthError::DeviceDisabled => AuthError::DeviceDisabled,
        RegistryAuthError::UnknownTenant => AuthError::UnknownTenant,
        RegistryAuthError::UnknownDevice => AuthError::UnknownDevice,
        RegistryAuthError::GatewayNotAuthorized => AuthError::GatewayNotAuthorized,
        RegistryAuthError::RateLimited | RegistryAuthError::Busy => AuthError::Busy,
        RegistryAuthError::Unavailable(why) => AuthError::Unavailable(why),
    }
}

/// Device authentication attempts by credential type and outcome. No tenant label: the
/// tenant comes from unauthenticated input and would let anyone grow the label set.
fn count_attempt<T>(cred_type: &'static str, result: &Result<T, RegistryAuthError>) {
    let outcome = match result {
        Ok(_) => "success",
        Err(
            RegistryAuthError::BadCredentials
            | RegistryAuthError::UnknownTenant
            | RegistryAuthError::UnknownDevice
            | RegistryAuthError::GatewayNotAuthorized,
        ) => "bad_credentials",
        Err(RegistryAuthError::TenantDisabled | RegistryAuthError::DeviceDisabled) => "disabled",
        Err(RegistryAuthError::RateLimited | RegistryAuthError::Busy) => "busy",
        Err(RegistryAuthError::Unavailable(_)) => "unavailable",
    };
    metrics::counter!("ferrule_auth_attempts_total", "type" => cred_type, "outcome" => outcome)
        .increment(1);
}

impl RegistryDevices {
    /// The end of every device authentication: counts the attempt, maps the error, and
    /// warms the tenant/device look-up caches that every publish consults, so that a
    /// device's first publish is answered without waiting for storage.
    async fn identified(
        &self,
        credential: &'static str,
        result: Result<ferrule_device_registry::auth::AuthenticatedDevice, RegistryAuthError>,
    ) -> Result<DeviceIdentity, AuthError> {
        count_attempt(credential, &result);
        let device = result.map_err(map)?;
        let _ = self.0.authorize_device(device.tenant.as_str(), device.device.as_str(), None).await;
        Ok(DeviceIdentity {
            tenant: device.tenant.to_string(),
            device_id: device.device.to_string(),
            auth_id: device.auth_id,
        })
    }
}

impl DeviceRegistry for RegistryDevices {
    fn authenticate_password<'a>(
        &'a self,
        tenant: &'a str,
        auth_id: &'a str,
        password: &'a [u8],
        source: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<DeviceIdentity, AuthError>> {
        Box::pin(async move {
            let result = self
                .0
                .authenticate_from(
                    tenant,
                    CredentialType::HashedPassword,
                    auth_id,
                    password,
                    source,
                )
                .await;
            self.identified("hashed-password", result).await
        })
    }

    fn authenticate_certificate<'a>(
        &'a self,
        der: &'a [u8],
    ) -> BoxFuture<'a, Result<DeviceIdentity, AuthError>> {
        Box::pin(async move {
            let result = self.0.authenticate_certificate(der).await;
            self.identified("x509-cert", result).await
        })
    }

    fn change_seq(&self) -> Option<u64> {
        Some(self.0.change_seq())
    }

    fn authorize_device<'a>(
        &'a self,
        tenant: &'a str,
        device_id: &'a str,
        gateway: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AuthError>> {
        Box::pin(
            async move { self.0.authorize_device(tenant, device_id, gateway).await.map_err(map) },
        )
    }

    fn adapter_access<'a>(
        &'a self,
        tenant: &'a str,
        adapter: &'a str,
    ) -> BoxFuture<'a, Result<AdapterAccess, AuthError>> {
        Box::pin(async move {
            let access = self.0.adapter_access(tenant, adapter).await.map_err(map)?;
            Ok(AdapterAccess {
                enabled: access.enabled,
                unauthenticated: access.unauthenticated,
                limits: TenantLimits {
                    max_connections: access.max_connections,
                    data_volume: access.data_volume,
                    connection_duration: access.connection_duration,
                    minimum_message_size: access.minimum_message_size,
                    rate_per_tenant: access.messages_per_second,
                    rate_per_device: access.messages_per_second_per_device,
                    max_ttl: access.max_ttl,
                    max_ttl_telemetry_qos0: access.max_ttl_telemetry_qos0,
                    max_ttl_telemetry_qos1: access.max_ttl_telemetry_qos1,
                    max_ttd: access.max_ttd,
                    trace_sampling: match access.trace_sampling {
                        Some(SamplingMode::All) => Sampling::All,
                        Some(SamplingMode::None) => Sampling::None,
                        Some(SamplingMode::Default) | None => Sampling::Default,
                    },
                },
                defaults: access
                    .defaults
                    .as_ref()
                    .map(|d| std::sync::Arc::new(message_defaults(d))),
            })
        })
    }

    fn psk<'a>(
        &'a self,
        tenant: &'a str,
        auth_id: &'a str,
    ) -> BoxFuture<'a, Result<(DeviceIdentity, Vec<u8>), AuthError>> {
        Box::pin(async move {
            let result = self.0.psk_for(tenant, auth_id).await;
            count_attempt("psk", &result);
            let key = result.map_err(map)?;
            let identity = DeviceIdentity {
                tenant: tenant.to_owned(),
                device_id: key.device.to_string(),
                auth_id: auth_id.to_owned(),
            };
            Ok((identity, key.key))
        })
    }

    fn credential_usable<'a>(
        &'a self,
        identity: &'a DeviceIdentity,
        kind: CredentialKind,
    ) -> BoxFuture<'a, Result<bool, AuthError>> {
        let cred_type = match kind {
            CredentialKind::Password => CredentialType::HashedPassword,
            CredentialKind::Certificate => CredentialType::X509Cert,
        };
        Box::pin(async move {
            let DeviceIdentity { tenant, device_id, auth_id } = identity;
            self.0.credential_usable(tenant, cred_type, auth_id, device_id).await.map_err(map)
        })
    }
}

impl DeviceCheck for RegistryDevices {
    fn gateway_may_act_for(
        &self,
        tenant: &str,
        device: &str,
        gateway: &str,
    ) -> ferrule_command_control::BoxFuture<bool> {
        let auth = self.0.clone();
        let (tenant, device, gateway) = (tenant.to_owned(), device.to_owned(), gateway.to_owned());
        Box::pin(
            async move { auth.authorize_device(&tenant, &device, Some(&gateway)).await.is_ok() },
        )
    }

    fn may_receive_commands(
        &self,
        tenant: &str,
        device: &str,
    ) -> ferrule_command_control::BoxFuture<Option<bool>> {
        let auth = self.0.clone();
        let (tenant, device) = (tenant.to_owned(), device.to_owned());
        Box::pin(async move {
            match auth.authorize_device(&tenant, &device, None).await {
                Ok(_) => Some(true),
                Err(
                    RegistryAuthError::Unavailable(_)
                    | RegistryAuthError::Busy
                    | RegistryAuthError::RateLimited,
                ) => None,
                Err(_) => Some(false),
            }
        })
    }
}

/// Closes the MQTT connections of devices the registry no longer allows, for every change
/// the registry's caches have followed, until `stop`.
pub async fn close_revoked_connections(
    mut changes: tokio::sync::broadcast::Receiver<ferrule_device_registry::store::Change>,
    mqtt: ferrule_adapters::mqtt::Revalidator,
    stop: tokio_util::sync::CancellationToken,
) {
    use ferrule_adapters::door::Scope;
    use ferrule_device_registry::store::Change;
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            r = changes.recv() => match r {
                Ok(change) => change,
                Err(RecvError::Lagged(_)) => Change::All,
                Err(RecvError::Closed) => return,
            },
        };
        let scope = match change {
            Change::Tenant(t) => Scope::Tenant(t.to_string()),
            Change::Device(t, d) => Scope::Device(t.to_string(), d.to_string()),
            Change::All => Scope::All,
        };
        mqtt.revalidate(&scope).await;
    }
}

/// A tenant's `defaults` as the adapters apply them (Hono): `ttl` (seconds) and
/// `content-type` set what a message lacks; every other default is an application property
/// (strings as they are, other JSON values in their JSON form).
fn message_defaults(
    defaults: &serde_json::Map<String, serde_json::Value>,
) -> ferrule_adapters::quota::MessageDefaults {
    let mut out = ferrule_adapters::quota::MessageDefaults::default();
    for (key, value) in defaults {
        match (key.as_str(), value) {
            ("ttl", value) => out.ttl = value.as_u64().map(std::time::Duration::from_secs),
            ("content-type", serde_json::Value::String(ct)) => out.content_type = Some(ct.clone()),
            (_, serde_json::Value::String(s)) => out.properties.push((key.clone(), s.clone())),
            (_, serde_json::Value::Null) => {}
            (_, other) => out.properties.push((key.clone(), other.to_string())),
        }
    }
    out
}

/// Devices' connection state and deferred commands for the management API (`/v1/state`,
/// `/v1/commands`).
pub struct States(
    pub std::sync::Arc<ferrule_command_control::presence::Presence>,
    pub ferrule_messaging::Broker,
);

impl States {
    fn json(state: &ferrule_command_control::presence::DeviceState) -> serde_json::Value {
        let time = |ms: u64| {
            let ms = i64::try_from(ms).unwrap_or(i64::MAX);
            rfc3339(ms)
        };
        let mut v = serde_json::json!({
            "connected": state.connections > 0,
            "connections": state.connections,
            "adapter": state.adapter,
            "last-seen": time(state.last_seen),
        });
        if let Some(since) = state.connected_since {
            v["connected-since"] = time(since).into();
        }
        if let Some(gateway) = &state.last_gateway {
            v["last-known-gateway"] = gateway.as_str().into();
        }
        v
    }
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

impl ferrule_device_registry::api::DeviceStates for States {
    fn device_state(&self, tenant: &str, device: &str) -> Option<serde_json::Value> {
        self.0.get(tenant, device).map(|s| Self::json(&s))
    }

    fn tenant_states(&self, tenant: &str) -> Vec<(String, serde_json::Value)> {
        let (_, page) = self.0.page(tenant, 0, usize::MAX, None);
        page.into_iter().map(|(device, s)| (device, Self::json(&s))).collect()
    }

    fn deferred_commands(&self, tenant: &str, device: &str) -> Vec<serde_json::Value> {
        let time = |ms: u64| rfc3339(i64::try_from(ms).unwrap_or(i64::MAX));
        let list = self.0.deferred_commands(tenant, device);
        list.into_iter()
            .map(|c| {
                serde_json::json!({
                    "id": c.id,
                    "name": c.name,
                    "queued": time(c.queued_at),
                    "expires": time(c.expires_at),
                    "status": c.status.as_str(),
                })
            })
            .collect()
    }

    fn delete_deferred_commands(&self, tenant: &str, device: &str) -> usize {
        let queue = format!("{}/{tenant}/{device}", ferrule_command_control::DEFERRED_PREFIX);
        let deleted = self.1.purge_queue(&queue).unwrap_or(0);
        self.0.deferred_deleted(tenant, device);
        deleted
    }
}
