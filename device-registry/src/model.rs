//! Tenants, devices and credentials in Hono's JSON shape (Device Registry Management API v1).
//!
//! Every struct uses Hono's field names and rejects unknown properties, so a typo in a
//! request is a 400, not a silently dropped setting. Open-ended maps (`ext`, `defaults`)
//! are `serde_json` maps, exactly as the spec allows.
//!
//! Size: Hono's whole JSON schema (tenants, devices, every credential and secret type) in
//! one file, so that the API's shapes can be read side by side with the OpenAPI spec; the
//! `schema!` macro carries the serde attributes every schema struct shares, and the tests
//! are the last 50 lines.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// JSON object used for `ext`, `defaults` and other open maps.
pub type JsonMap = Map<String, Value>;

/// For optional properties: absent is `None`, but an explicit `null` is refused (the
/// spec types these properties as objects/strings/arrays, never nullable).
fn no_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// Declares structs of Hono's schema: `Clone`, `Debug`, `PartialEq`, serde with kebab-case
/// property names and unknown properties refused. Every `Option` field is an optional
/// property: absent is `None`, an explicit `null` is refused ([`no_null`]) and `None` is
/// left out of the JSON. Other fields keep the attributes written on them.
macro_rules! schema {
    ($($(#[$m:meta])* pub struct $name:ident $(<$g:ident>)? { $($fields:tt)* })*) => {
        $(schema!(@fields [$(#[$m])* pub struct $name $(<$g>)?] [] $($fields)*);)*
    };
    // An `Option` field: an optional property.
    (@fields $head:tt [$($done:tt)*]
        $(#[$fm:meta])* pub $f:ident: Option<$t:ty>, $($rest:tt)*) => {
        schema!(@fields $head [$($done)*
            $(#[$fm])*
            #[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")]
            pub $f: Option<$t>,
        ] $($rest)*);
    };
    // Any other field, as written.
    (@fields $head:tt [$($done:tt)*] $(#[$fm:meta])* pub $f:ident: $t:ty, $($rest:tt)*) => {
        schema!(@fields $head [$($done)* $(#[$fm])* pub $f: $t,] $($rest)*);
    };
    (@fields [$(#[$m:meta])* pub struct $name:ident $(<$g:ident>)?] [$($done:tt)*]) => {
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        $(#[$m])*
        pub struct $name $(<$g>)? { $($done)* }
    };
}

/// Why an identifier was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The identifier is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// The identifier is longer than [`MAX_ID_LEN`].
    #[error("{0} is longer than {MAX_ID_LEN} characters")]
    TooLong(&'static str),
    /// The identifier has a character outside Hono's default id pattern.
    #[error("{0} contains characters outside {1}")]
    BadChar(&'static str, &'static str),
}

/// Upper bound on id length: ids become storage keys and cache keys; Hono sets no limit,
/// but an unbounded key is a memory and storage hazard.
pub const MAX_ID_LEN: usize = 256;

macro_rules! id_newtype {
    ($name:ident, $what:literal, $pattern:literal, $extra:expr) => {
        #[doc = concat!("A validated ", $what, " (Hono's default pattern `", $pattern, "`).")]
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `s` against the id pattern.
            ///
            /// # Errors
            /// [`IdError`] naming the violated rule.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                if s.is_empty() {
                    return Err(IdError::Empty($what));
                }
                if s.len() > MAX_ID_LEN {
                    return Err(IdError::TooLong($what));
                }
                let extra: &[char] = $extra;
                if !s.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || extra.contains(&c)
                }) {
                    return Err(IdError::BadChar($what, $pattern));
                }
                Ok(Self(s))
            }

            /// The id as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_newtype!(TenantId, "tenant id", "^[a-zA-Z0-9-_.]+$", &[]);
id_newtype!(DeviceId, "device id", "^[a-zA-Z0-9-_.:=]+$", &[':', '=']);

schema! {
    /// A tenant's configuration (`Tenant` schema).
    pub struct Tenant {
        /// Disabled tenants' devices cannot connect.
        #[serde(default = "yes")]
        pub enabled: bool,
        /// Alternative identifier; stored, not used for look-ups.
        pub alias: Option<String>,
        /// Free-form extension properties.
        pub ext: Option<JsonMap>,
        /// Per-adapter configuration; absent means all adapters enabled with defaults.
        pub adapters: Option<Vec<Adapter>>,
        /// Defaults applied to the tenant's devices.
        pub defaults: Option<JsonMap>,
        /// Minimum message size used for accounting.
        pub minimum_message_size: Option<i64>,
        /// Limits on the number of devices and credentials.
        pub registration_limits: Option<RegistrationLimits>,
        /// Connection, TTL and data-volume limits.
        pub resource_limits: Option<ResourceLimits>,
        /// Tracing sampling configuration.
        pub tracing: Option<TracingConfig>,
        /// Group of tenants that may share trusted CA subject DNs.
        pub trust_anchor_group: Option<String>,
        /// Trusted root CAs for X.509 client authentication.
        pub trusted_ca: Option<Vec<TrustedCa>>,
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self {
            enabled: true,
            alias: None,
            ext: None,
            adapters: None,
            defaults: None,
            minimum_message_size: None,
            registration_limits: None,
            resource_limits: None,
            tracing: None,
            trust_anchor_group: None,
            trusted_ca: None,
        }
    }
}

/// How a tenant lets its devices use one protocol adapter.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdapterAccess {
    /// The adapter is enabled for the tenant ([`Tenant::adapter_enabled`]).
    pub enabled: bool,
    /// The tenant is enabled and lets devices publish unauthenticated on the adapter.
    pub unauthenticated: bool,
    /// The tenant's `resource-limits.max-connections` (`None`: no limit).
    pub max_connections: Option<u32>,
    /// `resource-limits.data-volume`: bytes per period.
    pub data_volume: Option<UsageLimit>,
    /// `resource-limits.connection-duration`: seconds (the API's minutes × 60) per period.
    pub connection_duration: Option<UsageLimit>,
    /// `minimum-message-size` (0: none).
    pub minimum_message_size: u32,
    /// Ferrule's extension, `resource-limits.ext.max-messages-per-second`: messages per
    /// second of all the tenant's devices together.
    pub messages_per_second: Option<u32>,
    /// `resource-limits.ext.max-messages-per-second-per-device`.
    pub messages_per_second_per_device: Option<u32>,
    /// `resource-limits.max-ttl`, `max-ttl-telemetry-qos0`, `max-ttl-telemetry-qos1`
    /// (seconds; `None`: -1 or absent).
    pub max_ttl: Option<u32>,
    pub max_ttl_telemetry_qos0: Option<u32>,
    pub max_ttl_telemetry_qos1: Option<u32>,
    /// The adapter's `ext.max-ttd` (seconds).
    pub max_ttd: Option<u32>,
    /// The tenant's `defaults` (`None`: none or empty).
    pub defaults: Option<JsonMap>,
    /// The tenant's `tracing.sampling-mode`.
    pub trace_sampling: Option<SamplingMode>,
}

/// A limit in seconds from the API (-1 or absent: none).
fn seconds(value: Option<i64>) -> Option<u32> {
    value.filter(|v| *v >= 0).map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// `resource-limits.ext` key of a tenant's message rate (Ferrule's extension).
pub const RATE_EXT: &str = "max-messages-per-second";
/// `resource-limits.ext` key of a tenant's message rate per device.
pub const DEVICE_RATE_EXT: &str = "max-messages-per-second-per-device";

pub use ferrule_net::usage::UsageLimit;

/// A [`UsageLimit`] from the API's fields; `None` when there is no limit (`max` absent or
/// -1).
fn usage_limit(
    since: &DateTime<Utc>,
    max: Option<i64>,
    period: Option<&Period>,
) -> Option<UsageLimit> {
    let max = u64::try_from(max?).ok()?;
    let period_days = match period {
        Some(p) if p.mode == "days" => {
            Some(p.no_of_days.and_then(|n| u32::try_from(n).ok()).unwrap_or(1).max(1))
        }
        _ => None,
    };
    Some(UsageLimit { effective_since: since.timestamp(), max, period_days })
}

impl Tenant {
    /// Whether devices of this tenant may use `adapter_type` (e.g. `hono-mqtt`).
    /// Hono: no `adapters` list means every adapter is enabled.
    pub fn adapter_enabled(&self, adapter_type: &str) -> bool {
        match &self.adapters {
            None => true,
            Some(list) => list.iter().any(|a| a.r#type == adapter_type && a.enabled),
        }
    }

    /// How this tenant lets its devices use `adapter_type` (one look-up for both rules).
    pub fn access(&self, adapter_type: &str) -> AdapterAccess {
        let limits = self.resource_limits.as_ref();
        AdapterAccess {
            enabled: self.adapter_enabled(adapter_type),
            unauthenticated: self.enabled && self.allows_unauthenticated(adapter_type),
            max_connections: self
                .resource_limits
                .as_ref()
                .and_then(|limits| limits.max_connections)
                .filter(|max| *max >= 0)
                .map(|max| u32::try_from(max).unwrap_or(u32::MAX)),
            data_volume: self
                .resource_limits
                .as_ref()
                .and_then(|l| l.data_volume.as_ref())
                .and_then(|v| usage_limit(&v.effective_since, v.max_bytes, v.period.as_ref())),
            connection_duration: self
                .resource_limits
                .as_ref()
                .and_then(|l| l.connection_duration.as_ref())
                .and_then(|d| {
                    let max = d.max_minutes.map(|m| m.saturating_mul(60));
                    usage_limit(&d.effective_since, max, d.period.as_ref())
                }),
            minimum_message_size: self
                .minimum_message_size
                .and_then(|m| u32::try_from(m).ok())
                .unwrap_or(0),
            messages_per_second: self.rate_ext(RATE_EXT),
            messages_per_second_per_device: self.rate_ext(DEVICE_RATE_EXT),
            max_ttl: seconds(limits.and_then(|l| l.max_ttl)),
            max_ttl_telemetry_qos0: seconds(limits.and_then(|l| l.max_ttl_telemetry_qos0)),
            max_ttl_telemetry_qos1: seconds(limits.and_then(|l| l.max_ttl_telemetry_qos1)),
            max_ttd: self
                .adapters
                .iter()
                .flatten()
                .find(|a| a.r#type == adapter_type)
                .and_then(|a| a.ext.as_ref()?.get("max-ttd")?.as_i64())
                .and_then(|v| seconds(Some(v))),
            defaults: self.defaults.clone().filter(|d| !d.is_empty()),
            trace_sampling: self.tracing.as_ref().and_then(|t| t.sampling_mode),
        }
    }

    /// A positive integer under `resource-limits.ext.KEY`.
    fn rate_ext(&self, key: &str) -> Option<u32> {
        let ext = self.resource_limits.as_ref()?.ext.as_ref()?;
        ext.get(key)?.as_u64().and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0)
    }

    /// Whether `adapter_type` lets devices of this tenant publish unauthenticated.
    pub fn allows_unauthenticated(&self, adapter_type: &str) -> bool {
        match &self.adapters {
            None => false,
            Some(list) => list.iter().any(|a| {
                a.r#type == adapter_type && a.enabled && !a.device_authentication_required
            }),
        }
    }
}

/// Protocol adapter configuration of a tenant (`Adapter`, open for extra properties).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Adapter {
    /// Adapter type, e.g. `hono-mqtt`.
    pub r#type: String,
    /// Hono's default for a listed adapter is disabled.
    #[serde(default)]
    pub enabled: bool,
    /// Whether devices must authenticate.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub device_authentication_required: bool,
    /// Extension properties.
    #[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")]
    pub ext: Option<JsonMap>,
    /// The schema allows additional properties on adapters.
    #[serde(flatten)]
    pub other: JsonMap,
}

schema! {
    /// `RegistrationLimits` schema.
    pub struct RegistrationLimits {
        /// -1: no limit.
        pub max_devices: Option<i64>,
        /// -1: no limit.
        pub max_credentials_per_device: Option<i64>,
    }

    /// `ResourceLimit` schema.
    pub struct ResourceLimits {
        /// -1: no limit.
        pub max_connections: Option<i64>,
        /// Seconds; -1: no limit.
        pub max_ttl: Option<i64>,
        /// Seconds; -1: no limit.
        pub max_ttl_telemetry_qos0: Option<i64>,
        /// Seconds; -1: no limit.
        pub max_ttl_telemetry_qos1: Option<i64>,
        /// Seconds; -1: no limit.
        pub max_ttl_command_response: Option<i64>,
        /// Data volume per accounting period.
        pub data_volume: Option<DataVolume>,
        /// Connection time per accounting period.
        pub connection_duration: Option<ConnectionDuration>,
        /// Extension properties.
        pub ext: Option<JsonMap>,
    }

    /// `DataVolume` schema.
    pub struct DataVolume {
        /// When the limit takes effect.
        pub effective_since: DateTime<Utc>,
        /// -1: no limit.
        pub max_bytes: Option<i64>,
        /// Accounting period.
        pub period: Option<Period>,
    }

    /// `ConnectionDuration` schema.
    pub struct ConnectionDuration {
        /// When the limit takes effect.
        pub effective_since: DateTime<Utc>,
        /// -1: no limit.
        pub max_minutes: Option<i64>,
        /// Accounting period.
        pub period: Option<Period>,
    }

    /// `Period` schema.
    pub struct Period {
        /// `monthly` or `days`.
        pub mode: String,
        /// Period length for mode `days`.
        pub no_of_days: Option<i64>,
    }

    /// `TracingConfig` schema.
    pub struct TracingConfig {
        /// `default`, `all` or `none`.
        pub sampling_mode: Option<SamplingMode>,
        /// Per auth-id sampling mode.
        pub sampling_mode_per_auth_id: Option<std::collections::BTreeMap<String, SamplingMode>>,
    }
}

/// Trace sampling mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplingMode {
    /// Adapter default.
    Default,
    /// Sample everything.
    All,
    /// Sample nothing.
    None,
}

schema! {
    /// `TrustedCA` schema. `cert` is stored as given (base64 DER) and not expanded into its
    /// parts in API answers; device authentication parses it (`x509.rs`) to verify client
    /// certificates issued by this CA.
    pub struct TrustedCa {
        /// Unique among the tenant's CAs; assigned by the registry if absent.
        pub id: Option<String>,
        /// RFC 2253 subject DN.
        pub subject_dn: Option<String>,
        /// DER subject DN, base64.
        pub subject_dn_bytes: Option<String>,
        /// DER public key, base64.
        pub public_key: Option<String>,
        /// Key algorithm (`RSA` default, `EC`).
        pub algorithm: Option<String>,
        /// Start of validity.
        pub not_before: Option<DateTime<Utc>>,
        /// End of validity.
        pub not_after: Option<DateTime<Utc>>,
        /// DER certificate, base64.
        pub cert: Option<String>,
        /// Template for auth-ids derived from client certificates.
        pub auth_id_template: Option<String>,
        /// Auto-provisioning of devices.
        #[serde(default, skip_serializing_if = "is_false")]
        pub auto_provisioning_enabled: bool,
        /// Auto-provisioning as gateways.
        #[serde(default, skip_serializing_if = "is_false")]
        pub auto_provision_as_gateway: bool,
        /// Device-id template for auto-provisioning.
        pub auto_provisioning_device_id_template: Option<String>,
        /// OCSP revocation checks.
        #[serde(default, skip_serializing_if = "is_false")]
        pub ocsp_revocation_enabled: bool,
        /// OCSP responder.
        pub ocsp_responder_uri: Option<String>,
        /// OCSP responder certificate.
        pub ocsp_responder_cert: Option<String>,
        /// OCSP nonce.
        #[serde(default, skip_serializing_if = "is_false")]
        pub ocsp_nonce_enabled: bool,
    }

    /// A device's registration (`Device` schema).
    pub struct Device {
        /// Disabled devices cannot connect, and gateways cannot act for them.
        #[serde(default = "yes")]
        pub enabled: bool,
        /// Defaults for the device's messages.
        pub defaults: Option<JsonMap>,
        /// Gateways allowed to act on behalf of this device.
        pub via: Option<Vec<String>>,
        /// Gateway groups allowed to act on behalf of this device.
        #[serde(rename = "viaGroups")]
        pub via_groups: Option<Vec<String>>,
        /// Groups this (gateway) device is a member of.
        #[serde(rename = "memberOf")]
        pub member_of: Option<Vec<String>>,
        /// Authorities granted to the device (e.g. `auto-provisioning-enabled`).
        pub authorities: Option<Vec<String>>,
        /// Downstream payload mapper name.
        pub downstream_message_mapper: Option<String>,
        /// Upstream payload mapper name.
        pub upstream_message_mapper: Option<String>,
        /// Extension properties.
        pub ext: Option<JsonMap>,
        /// Registry-maintained metadata; ignored on input.
        pub status: Option<DeviceStatus>,
        /// Where commands are sent for devices reached over HTTP callbacks.
        pub command_endpoint: Option<CommandEndpoint>,
    }
}

impl Default for Device {
    fn default() -> Self {
        Self {
            enabled: true,
            defaults: None,
            via: None,
            via_groups: None,
            member_of: None,
            authorities: None,
            downstream_message_mapper: None,
            upstream_message_mapper: None,
            ext: None,
            status: None,
            command_endpoint: None,
        }
    }
}

impl Device {
    /// Whether `gateway` may act for this device (listed in `via`, or a member of one of
    /// the `viaGroups` — group membership is checked by the caller with the gateway's
    /// `memberOf`).
    pub fn is_served_by(&self, gateway: &str, gateway_device: Option<&Device>) -> bool {
        if self.via.as_ref().is_some_and(|v| v.iter().any(|g| g == gateway)) {
            return true;
        }
        match (&self.via_groups, gateway_device.and_then(|g| g.member_of.as_ref())) {
            (Some(groups), Some(member_of)) => groups.iter().any(|g| member_of.contains(g)),
            _ => false,
        }
    }
}

schema! {
    /// `Status` schema (read-only metadata).
    #[derive(Default)]
    pub struct DeviceStatus {
        /// Creation time.
        pub created: Option<DateTime<Utc>>,
        /// Last update time.
        pub updated: Option<DateTime<Utc>>,
        /// Last user who changed the device.
        pub last_user: Option<String>,
        /// Whether the device was auto-provisioned.
        #[serde(default, skip_serializing_if = "is_false")]
        pub auto_provisioned: bool,
        /// Whether the auto-provisioning notification was sent.
        #[serde(default, skip_serializing_if = "is_false")]
        pub auto_provisioning_notification_sent: bool,
    }

    /// `command-endpoint` of a device.
    pub struct CommandEndpoint {
        /// Target URI (`{{deviceId}}` placeholder).
        pub uri: String,
        /// Extra headers.
        pub headers: Option<JsonMap>,
        /// Extra payload properties.
        pub payload_properties: Option<JsonMap>,
    }
}

/// The credential types (`type` discriminator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CredentialType {
    /// `hashed-password`
    HashedPassword,
    /// `psk`
    Psk,
    /// `x509-cert`
    X509Cert,
    /// `rpk`
    Rpk,
}

impl CredentialType {
    /// Hono's name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HashedPassword => "hashed-password",
            Self::Psk => "psk",
            Self::X509Cert => "x509-cert",
            Self::Rpk => "rpk",
        }
    }
}

impl fmt::Display for CredentialType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CredentialType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "hashed-password" => Self::HashedPassword,
            "psk" => Self::Psk,
            "x509-cert" => Self::X509Cert,
            "rpk" => Self::Rpk,
            other => return Err(format!("unknown credential type {other:?}")),
        })
    }
}

/// One entry of a device's credentials set (`TypedCredentials`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Credentials {
    /// Username/password.
    #[serde(rename = "hashed-password")]
    HashedPassword(PasswordCredentials),
    /// Pre-shared key (CoAP DTLS).
    #[serde(rename = "psk")]
    Psk(PskCredentials),
    /// X.509 client certificate, identified by its subject DN.
    #[serde(rename = "x509-cert")]
    X509Cert(X509Credentials),
    /// Raw public key.
    #[serde(rename = "rpk")]
    Rpk(RpkCredentials),
}

impl Credentials {
    /// The credential type.
    pub fn cred_type(&self) -> CredentialType {
        match self {
            Self::HashedPassword(_) => CredentialType::HashedPassword,
            Self::Psk(_) => CredentialType::Psk,
            Self::X509Cert(_) => CredentialType::X509Cert,
            Self::Rpk(_) => CredentialType::Rpk,
        }
    }

    /// The authentication identifier (empty if a x509 entry came without one).
    pub fn auth_id(&self) -> &str {
        match self {
            Self::HashedPassword(c) => &c.auth_id,
            Self::Psk(c) => &c.auth_id,
            Self::X509Cert(c) => c.auth_id.as_deref().unwrap_or(""),
            Self::Rpk(c) => &c.auth_id,
        }
    }

    /// Whether the credentials entry is enabled.
    pub fn enabled(&self) -> bool {
        match self {
            Self::HashedPassword(c) => c.enabled,
            Self::Psk(c) => c.enabled,
            Self::X509Cert(c) => c.enabled,
            Self::Rpk(c) => c.enabled,
        }
    }

    /// Metadata of each secret, in order.
    pub fn secret_meta(&self) -> Vec<&SecretMeta> {
        match self {
            Self::HashedPassword(c) => c.secrets.iter().map(|s| &s.meta).collect(),
            Self::Psk(c) => c.secrets.iter().map(|s| &s.meta).collect(),
            Self::X509Cert(c) => c.secrets.iter().flatten().map(|s| &s.meta).collect(),
            Self::Rpk(c) => c.secrets.iter().map(|s| &s.meta).collect(),
        }
    }

    /// The same entry with all confidential material removed (what GET returns).
    pub fn redacted(&self) -> Credentials {
        let mut c = self.clone();
        match &mut c {
            Self::HashedPassword(p) => {
                for s in &mut p.secrets {
                    s.hash_function = None;
                    s.pwd_hash = None;
                    s.salt = None;
                    s.pwd_plain = None;
                }
            }
            Self::Psk(p) => {
                for s in &mut p.secrets {
                    s.key = None;
                }
            }
            Self::X509Cert(x) => x.cert = None,
            Self::Rpk(r) => {
                for s in &mut r.secrets {
                    s.cert = None;
                }
            }
        }
        c
    }
}

/// Properties common to every secret (`CommonSecret`). On the wire they sit next to the
/// type-specific properties; each secret type has a flat wire struct (serde's `flatten`
/// cannot be combined with `deny_unknown_fields`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SecretMeta {
    /// Registry-assigned id used by patch-mode updates.
    pub id: Option<String>,
    /// Whether the secret may be used (absent = true).
    pub enabled: Option<bool>,
    /// Start of validity.
    pub not_before: Option<DateTime<Utc>>,
    /// End of validity.
    pub not_after: Option<DateTime<Utc>>,
    /// Free text.
    pub comment: Option<String>,
}

impl SecretMeta {
    /// Whether the secret is enabled and `now` lies in its validity window.
    pub fn usable_at(&self, now: DateTime<Utc>) -> bool {
        self.enabled.unwrap_or(true)
            && self.not_before.is_none_or(|nb| nb <= now)
            && self.not_after.is_none_or(|na| now <= na)
    }
}

/// Declares a secret type with `meta: SecretMeta` plus its own fields, and a flat wire
/// struct that serde maps to and from.
macro_rules! secret_type {
    ($(#[$m:meta])* $name:ident, $wire:ident, $wire_str:literal { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Serialize, Deserialize)]
        #[serde(from = $wire_str, into = $wire_str)]
        pub struct $name {
            /// `id`, `enabled`, `not-before`, `not-after`, `comment`.
            pub meta: SecretMeta,
            $($(#[$fm])* pub $f: $t,)*
        }

        secret_type!(@wire $wire {
            id: Option<String>,
            enabled: Option<bool>,
            not_before: Option<DateTime<Utc>>,
            not_after: Option<DateTime<Utc>>,
            comment: Option<String>,
            $($f: $t,)*
        });

        impl AsRef<SecretMeta> for $name {
            fn as_ref(&self) -> &SecretMeta {
                &self.meta
            }
        }

        impl AsMut<SecretMeta> for $name {
            fn as_mut(&mut self) -> &mut SecretMeta {
                &mut self.meta
            }
        }

        impl From<$wire> for $name {
            fn from(w: $wire) -> Self {
                Self {
                    meta: SecretMeta { id: w.id, enabled: w.enabled, not_before: w.not_before, not_after: w.not_after, comment: w.comment },
                    $($f: w.$f,)*
                }
            }
        }

        impl From<$name> for $wire {
            fn from(s: $name) -> Self {
                Self {
                    id: s.meta.id, enabled: s.meta.enabled, not_before: s.meta.not_before,
                    not_after: s.meta.not_after, comment: s.meta.comment,
                    $($f: s.$f,)*
                }
            }
        }
    };
    // The flat wire struct: every property optional, as in [`schema!`] (not `Debug`: it
    // holds secret material).
    (@wire $wire:ident { $($f:ident: $t:ty,)* }) => {
        #[derive(Clone, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        #[doc(hidden)]
        pub struct $wire {
            $(#[serde(default, deserialize_with = "no_null", skip_serializing_if = "Option::is_none")] $f: $t,)*
        }
    };
}

secret_type!(
    /// A password secret. `pwd-plain` only ever exists in requests: it is replaced by an
    /// argon2id PHC string before anything is stored. Debug output hides all material.
    PasswordSecret, PasswordSecretWire, "PasswordSecretWire" {
        /// `bcrypt`, `sha-256`, `sha-512`; Ferrule's own hashes use `argon2id`.
        hash_function: Option<String>,
        /// The hash (bcrypt/PHC string, or base64 digest for sha-*).
        pwd_hash: Option<String>,
        /// Base64 salt for sha-* hashes.
        salt: Option<String>,
        /// Clear text password (requests only).
        pwd_plain: Option<String>,
    }
);

impl fmt::Debug for PasswordSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasswordSecret")
            .field("meta", &self.meta)
            .field("hash_function", &self.hash_function)
            .field("pwd_hash", &self.pwd_hash.as_ref().map(|_| "<redacted>"))
            .field("salt", &self.salt.as_ref().map(|_| "<redacted>"))
            .field("pwd_plain", &self.pwd_plain.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

secret_type!(
    /// A pre-shared key. Debug output hides the key.
    PskSecret, PskSecretWire, "PskSecretWire" {
        /// Base64 key; required on write, omitted in responses.
        key: Option<String>,
    }
);

impl fmt::Debug for PskSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskSecret")
            .field("meta", &self.meta)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

secret_type!(
    /// An x509 secret: only its validity window.
    #[derive(Debug)]
    X509Secret, X509SecretWire, "X509SecretWire" {}
);

secret_type!(
    /// A raw public key secret.
    #[derive(Debug)]
    RpkSecret, RpkSecretWire, "RpkSecretWire" {
        /// Key algorithm.
        algorithm: Option<String>,
        /// DER public key, base64.
        key: Option<String>,
        /// DER certificate, base64 (write-only).
        cert: Option<String>,
    }
);

schema! {
    /// Credentials with an auth-id and secrets of type `S` (`hashed-password`, `psk`, `rpk`).
    pub struct SecretCredentials<S> {
        /// The authentication identifier: a user name (`hashed-password`) or PSK identity
        /// (`psk`), before `@tenant`; a raw public key's identifier (`rpk`).
        pub auth_id: String,
        /// Whether this entry may be used.
        #[serde(default = "yes")]
        pub enabled: bool,
        /// Extension properties.
        pub ext: Option<JsonMap>,
        /// At least one secret.
        pub secrets: Vec<S>,
    }

    /// `x509-cert` credentials.
    pub struct X509Credentials {
        /// RFC 2253 subject DN.
        pub auth_id: Option<String>,
        /// Whether this entry may be used.
        #[serde(default = "yes")]
        pub enabled: bool,
        /// Extension properties.
        pub ext: Option<JsonMap>,
        /// Validity period (at most one secret).
        pub secrets: Option<Vec<X509Secret>>,
        /// DER certificate, base64 (write-only): its subject DN becomes the auth-id.
        pub cert: Option<String>,
    }
}

/// `hashed-password` credentials.
pub type PasswordCredentials = SecretCredentials<PasswordSecret>;
/// `psk` credentials.
pub type PskCredentials = SecretCredentials<PskSecret>;
/// `rpk` credentials (stored; no adapter uses them yet).
pub type RpkCredentials = SecretCredentials<RpkSecret>;

/// A stored value with its resource version (the ETag).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    /// Opaque version, changes on every write.
    pub version: String,
    /// The value.
    pub value: T,
}

/// A new random resource version.
pub fn new_version() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_hono_patterns() {
        assert!(TenantId::new("DEFAULT_TENANT").is_ok());
        assert!(TenantId::new("a.b-c_d").is_ok());
        assert!(TenantId::new("a:b").is_err());
        assert!(TenantId::new("").is_err());
        assert!(DeviceId::new("urn:dev=4711").is_ok());
        assert!(DeviceId::new("a/b").is_err());
        assert!(DeviceId::new("ü").is_err());
        assert!(DeviceId::new("x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn unknown_properties_are_rejected() {
        assert!(serde_json::from_str::<Tenant>(r#"{"enabled":true,"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<Device>(r#"{"viaGroups":["g"],"vai":[]}"#).is_err());
        let c =
            r#"{"type":"hashed-password","auth-id":"a","secrets":[{"pwd-plain":"x","bogus":1}]}"#;
        assert!(serde_json::from_str::<Credentials>(c).is_err());
        assert!(serde_json::from_str::<Tenant>(r#"{"ext":null}"#).is_err());
        assert!(serde_json::from_str::<Device>(r#"{"via":null}"#).is_err());
        let c = r#"{"type":"psk","auth-id":"a","secrets":[{"key":null}]}"#;
        assert!(serde_json::from_str::<Credentials>(c).is_err());
    }

    #[test]
    fn credentials_round_trip_with_hono_names() {
        let c = r#"{"type":"hashed-password","auth-id":"sensor1","secrets":[{"id":"s1","not-after":"2027-12-24T19:00:00Z","pwd-hash":"AQIDBAUGBwg=","salt":"Mq7wFw==","hash-function":"sha-512"}]}"#;
        let parsed: Credentials = serde_json::from_str(c).unwrap();
        assert_eq!(parsed.cred_type(), CredentialType::HashedPassword);
        assert_eq!(parsed.auth_id(), "sensor1");
        let out = serde_json::to_value(parsed.redacted()).unwrap();
        assert_eq!(out["secrets"][0].get("pwd-hash"), None);
        assert_eq!(out["secrets"][0]["id"], "s1");
        assert_eq!(out["type"], "hashed-password");
    }

    #[test]
    fn debug_hides_secret_material() {
        let s = PasswordSecret {
            meta: SecretMeta::default(),
            hash_function: None,
            pwd_hash: Some("HASHVALUE".into()),
            salt: None,
            pwd_plain: Some("hunter2".into()),
        };
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2") && !d.contains("HASHVALUE"));
    }
}
