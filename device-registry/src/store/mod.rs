//! Storage behind one trait: [`EmbeddedStore`] (redb file, the default) and
//! [`RedisStore`] (shared by several registry instances).
//!
//! Stores keep validated model values with a resource version each; they know nothing of
//! HTTP or password hashing. Every write announces a [`Change`] on [`RegistryStore::subscribe`]
//! so caches can drop what the write made stale; the Redis store also relays changes made
//! by other instances (pub/sub).

mod embedded;
mod redis;

pub use embedded::EmbeddedStore;
pub use redis::RedisStore;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::model::{
    new_version, CredentialType, Credentials, Device, DeviceId, IdError, Tenant, TenantId,
    Versioned,
};
use crate::x509;

/// Storage failures, mapped to HTTP statuses in one place (`api`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The tenant, device or credentials do not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Create of an id that exists.
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// `If-Match` named another version than the stored one.
    #[error("resource version mismatch")]
    VersionMismatch,
    /// The write conflicts with other data (e.g. an auth-id used by another device).
    #[error("{0}")]
    Conflict(String),
    /// A tenant's `trusted-ca` names a CA subject DN that another tenant already trusts
    /// (Hono's 409: a client certificate's issuer must identify one tenant).
    #[error("Root Certificate Authority {subject_dn} is already used by another tenant")]
    CaSubjectInUse {
        /// The RFC 2253 subject DN, as the refused request named it.
        subject_dn: String,
    },
    /// The backend failed (I/O, connection, ...).
    #[error("storage backend error: {0}")]
    Backend(String),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// What a write changed; caches drop entries under the changed scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A tenant was changed or deleted (with all its devices).
    Tenant(TenantId),
    /// A device or its credentials were changed or deleted.
    Device(TenantId, DeviceId),
    /// Changes may have been missed (e.g. pub/sub reconnect): drop everything.
    All,
}

/// Capacity of the change broadcast; a receiver that lags gets `Lagged` and must treat
/// it as [`Change::All`].
pub const CHANGE_CHANNEL_CAPACITY: usize = 4096;

/// The registry's storage. `if_match` is an expected resource version (`None`: any).
/// Deleting a tenant deletes its devices and credentials; deleting a device deletes its
/// credentials; creating a device creates an empty credentials set. Creating or updating
/// a tenant fails with [`StoreError::CaSubjectInUse`] if one of its trusted CAs has the
/// subject DN ([`x509::dn_key`]) of another tenant's trusted CA ([`ca_subject_in_use`]).
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Creates a tenant; returns its version.
    async fn create_tenant(&self, id: &TenantId, tenant: &Tenant) -> Result<String, StoreError>;
    /// Reads a tenant.
    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Versioned<Tenant>>, StoreError>;
    /// Replaces a tenant; returns the new version.
    async fn update_tenant(
        &self,
        id: &TenantId,
        tenant: &Tenant,
        if_match: Option<&str>,
    ) -> Result<String, StoreError>;
    /// Deletes a tenant with all its devices and credentials.
    async fn delete_tenant(&self, id: &TenantId, if_match: Option<&str>) -> Result<(), StoreError>;
    /// All tenants, ordered by id.
    async fn list_tenants(&self) -> Result<Vec<(TenantId, Versioned<Tenant>)>, StoreError>;

    /// Creates a device in an existing tenant; returns its version.
    async fn create_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        device: &Device,
    ) -> Result<String, StoreError>;
    /// Reads a device.
    async fn get_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
    ) -> Result<Option<Versioned<Device>>, StoreError>;
    /// Replaces a device; returns the new version.
    async fn update_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        device: &Device,
        if_match: Option<&str>,
    ) -> Result<String, StoreError>;
    /// Deletes a device and its credentials.
    async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        if_match: Option<&str>,
    ) -> Result<(), StoreError>;
    /// All devices of a tenant, ordered by id.
    async fn list_devices(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(DeviceId, Versioned<Device>)>, StoreError>;
    /// Deletes all devices (and credentials) of a tenant.
    async fn delete_devices_of_tenant(&self, tenant: &TenantId) -> Result<(), StoreError>;

    /// A device's credentials set (`None`: no such device).
    async fn get_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<Versioned<Vec<Credentials>>>, StoreError>;
    /// Replaces a device's credentials set. Fails with `Conflict` if a (type, auth-id) is
    /// registered for another device of the tenant.
    async fn set_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        credentials: &[Credentials],
        if_match: Option<&str>,
    ) -> Result<String, StoreError>;
    /// Finds the credentials entry for (tenant, type, auth-id) and its device.
    async fn find_credentials(
        &self,
        tenant: &TenantId,
        cred_type: CredentialType,
        auth_id: &str,
    ) -> Result<Option<(DeviceId, Credentials)>, StoreError>;

    /// Changes made from now on (by this instance, and by others sharing the store).
    fn subscribe(&self) -> broadcast::Receiver<Change>;

    /// The password verifier ([`crate::verifiers`]) kept for `auth_id` of `tenant` by a
    /// store that every instance of a cluster shares, so that an instance that never saw
    /// a device (a new pod, an ephemeral data directory) is spared its argon2 run too.
    /// Stores of one instance keep none (the instance's verifier file does).
    async fn get_verifier(
        &self,
        tenant: &TenantId,
        auth_id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let _ = (tenant, auth_id);
        Ok(None)
    }

    /// Keeps `value` as the password verifier of `auth_id` of `tenant` (see
    /// [`RegistryStore::get_verifier`]); deleting the tenant deletes it.
    async fn put_verifier(
        &self,
        tenant: &TenantId,
        auth_id: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let _ = (tenant, auth_id, value);
        Ok(())
    }
}

/// Whether `if_match` (an ETag from a client: maybe quoted, maybe weak, maybe `*`)
/// accepts `current`.
pub fn version_matches(if_match: Option<&str>, current: &str) -> bool {
    let Some(v) = if_match else { return true };
    v.split(',').any(|tag| {
        let tag = tag.trim();
        let tag = tag.strip_prefix("W/").unwrap_or(tag);
        tag == "*" || tag.trim_matches('"') == current
    })
}

/// A [`StoreError::Backend`] from the backend's error.
pub(crate) fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A [`StoreError::Corrupt`] for a stored key that is not a valid id.
pub(crate) fn corrupt(e: IdError) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// A new version for `value` and the record to store: the encoded [`Versioned`].
pub(crate) fn new_record<T: serde::Serialize>(value: &T) -> Result<(String, Vec<u8>), StoreError> {
    let version = new_version();
    let rec = encode(&Versioned { version: version.clone(), value })?;
    Ok((version, rec))
}

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, StoreError> {
    // Position only: serde's message may quote stored values, and records hold hashes.
    serde_json::from_slice(b).map_err(|e| {
        StoreError::Corrupt(format!(
            "undecodable record ({:?} error at column {})",
            e.classify(),
            e.column()
        ))
    })
}

/// The trusted-CA subject DNs of `tenant`: ([`x509::dn_key`], RFC 2253 form) each.
/// Entries whose subject cannot be decoded name none (the management layer refuses them;
/// such an entry trusts nothing).
pub(crate) fn ca_subjects(tenant: &Tenant) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = tenant
        .trusted_ca
        .iter()
        .flatten()
        .filter_map(|ca| x509::trusted_ca_subject(ca).ok().flatten())
        .map(|dn| (x509::dn_key(&dn), dn))
        .collect();
    // One tenant may list several CAs with one subject (e.g. a key roll-over).
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The first of `mine` (from [`ca_subjects`]) that `other` also trusts, as
/// [`StoreError::CaSubjectInUse`]. Stores run this against every other tenant inside
/// the write that creates or updates a tenant.
///
/// Hono lets tenants of one `trust-anchor-group` share a subject DN (the device then names
/// its tenant through TLS SNI); Ferrule has no such tenant hint, so sharing is refused
/// within a group as well.
pub(crate) fn ca_subject_in_use(
    mine: &[(String, String)],
    other: &Tenant,
) -> Result<(), StoreError> {
    if mine.is_empty() {
        return Ok(());
    }
    let theirs = ca_subjects(other);
    match mine.iter().find(|(k, _)| theirs.iter().any(|(o, _)| o == k)) {
        Some((_, dn)) => Err(StoreError::CaSubjectInUse { subject_dn: dn.clone() }),
        None => Ok(()),
    }
}

/// The (type, auth-id) keys of a credentials set, rejecting duplicates.
pub(crate) fn index_keys(
    creds: &[Credentials],
) -> Result<Vec<(CredentialType, String)>, StoreError> {
    let mut keys: Vec<(CredentialType, String)> = Vec::with_capacity(creds.len());
    for c in creds {
        let k = (c.cred_type(), c.auth_id().to_owned());
        if keys.contains(&k) {
            return Err(StoreError::Conflict(format!(
                "duplicate credentials for type {} and auth-id",
                k.0
            )));
        }
        keys.push(k);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::version_matches;

    #[test]
    fn if_match_forms() {
        assert!(version_matches(None, "v1"));
        assert!(version_matches(Some("v1"), "v1"));
        assert!(version_matches(Some("\"v1\""), "v1"));
        assert!(version_matches(Some("W/\"v1\""), "v1"));
        assert!(version_matches(Some("*"), "v1"));
        assert!(version_matches(Some("\"a\", \"v1\""), "v1"));
        assert!(!version_matches(Some("v2"), "v1"));
    }
}
