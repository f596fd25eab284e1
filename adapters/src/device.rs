//! What the adapters need from the device registry, as a trait: the adapters do not care
//! how devices are stored, only whether a device may connect and publish.

use std::future::Future;
use std::pin::Pin;

/// A boxed future, for the object-safe registry trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An authenticated device (or gateway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub tenant: String,
    pub device_id: String,
    pub auth_id: String,
}

/// Why a device is refused. Each adapter maps these to its protocol's answer in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Unknown auth-id, wrong secret, expired secret: deliberately indistinguishable.
    #[error("bad credentials")]
    BadCredentials,
    /// The tenant does not exist.
    #[error("unknown tenant")]
    UnknownTenant,
    /// The tenant is disabled, or this adapter is disabled for it.
    #[error("tenant disabled")]
    TenantDisabled,
    /// The device does not exist.
    #[error("unknown device")]
    UnknownDevice,
    /// The device is disabled.
    #[error("device disabled")]
    DeviceDisabled,
    /// A gateway tried to act for a device that does not list it in `via`.
    #[error("gateway not authorised for this device")]
    GatewayNotAuthorized,
    /// The device authenticated for one tenant and names another.
    #[error("tenant mismatch")]
    TenantMismatch,
    /// Too many failed attempts or verifications in flight: try later.
    #[error("registry busy")]
    Busy,
    /// The registry failed.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

/// How a tenant lets its devices use one adapter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdapterAccess {
    /// The adapter is enabled for the tenant.
    pub enabled: bool,
    /// The tenant is enabled and lets devices publish unauthenticated on the adapter.
    pub unauthenticated: bool,
    /// The tenant's limits (`resource-limits`, `minimum-message-size`).
    pub limits: crate::quota::TenantLimits,
    /// The tenant's `defaults` for its devices' messages (`None`: it has none).
    pub defaults: Option<std::sync::Arc<crate::quota::MessageDefaults>>,
}

/// The adapters' view of the device registry.
pub trait DeviceRegistry: Send + Sync + 'static {
    /// Verifies a `hashed-password` credential presented from `source` (the client's
    /// address, when known: failures are remembered per source as well as per auth-id).
    fn authenticate_password<'a>(
        &'a self,
        tenant: &'a str,
        auth_id: &'a str,
        password: &'a [u8],
        source: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<DeviceIdentity, AuthError>>;

    /// Authenticates a device by the X.509 certificate (DER, end entity) it presented in
    /// the TLS handshake: issued by its tenant's trusted CA, subject DN registered as an
    /// `x509-cert` credential. A registry without certificate support refuses them all.
    fn authenticate_certificate<'a>(
        &'a self,
        der: &'a [u8],
    ) -> BoxFuture<'a, Result<DeviceIdentity, AuthError>> {
        let _ = der;
        Box::pin(async { Err(AuthError::BadCredentials) })
    }

    /// Checks that `device_id` exists and is enabled in `tenant` (and its tenant is
    /// enabled); with `gateway`, also that the device lists the gateway in `via`.
    fn authorize_device<'a>(
        &'a self,
        tenant: &'a str,
        device_id: &'a str,
        gateway: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), AuthError>>;

    /// How `tenant` lets its devices use `adapter`: enabled (its `adapters` list; without
    /// one, every adapter) and whether devices may publish unauthenticated. An unknown
    /// tenant allows nothing.
    fn adapter_access<'a>(
        &'a self,
        tenant: &'a str,
        adapter: &'a str,
    ) -> BoxFuture<'a, Result<AdapterAccess, AuthError>>;

    /// Looks up the `psk` credential of `auth_id` in `tenant` (DTLS-PSK handshakes need the
    /// key itself, not a verification): the device it belongs to and the shared key. The
    /// device and its tenant must be enabled.
    fn psk<'a>(
        &'a self,
        tenant: &'a str,
        auth_id: &'a str,
    ) -> BoxFuture<'a, Result<(DeviceIdentity, Vec<u8>), AuthError>>;

    /// A number that changes whenever the registry processed a change that its answers
    /// may depend on (a tenant, device or credential written here or, in cluster mode,
    /// notified by another instance). A connection may reuse a positive answer while it
    /// stays the same, for at most [`crate::door::MEMO_TTL`] ([`crate::door::Memo`]).
    /// `None` (the default): answers are never reused.
    fn change_seq(&self) -> Option<u64> {
        None
    }

    /// Whether the credential of `kind` that authenticated `identity` still lets it in
    /// (it exists, belongs to the device and is enabled): connections it opened are closed
    /// once it does not. A registry that cannot tell keeps them.
    fn credential_usable<'a>(
        &'a self,
        identity: &'a DeviceIdentity,
        kind: CredentialKind,
    ) -> BoxFuture<'a, Result<bool, AuthError>> {
        let _ = (identity, kind);
        Box::pin(async { Ok(true) })
    }
}

/// The kind of credential a connection authenticated with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    /// `hashed-password` (the identity's `auth_id`).
    Password,
    /// `x509-cert` (the identity's `auth_id` is the subject DN).
    Certificate,
}
