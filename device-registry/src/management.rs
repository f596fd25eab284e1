//! Management operations: the rules Hono's API puts on top of plain storage (device
//! status timestamps, secret ids, password hashing, patch-mode secret updates, input
//! bounds). The HTTP layer (`api`) only parses and maps errors; everything that decides
//! what gets stored lives here.

use std::sync::Arc;

use chrono::Utc;
pub use ferrule_net::hashing::HashPool;
use ferrule_net::hashing::PoolError;

use crate::model::{
    Credentials, Device, DeviceId, DeviceStatus, SecretCredentials, SecretMeta, Tenant, TenantId,
    Versioned,
};
use crate::password::{self, PasswordError, ARGON2ID};
use crate::store::{RegistryStore, StoreError};

/// Most credentials entries one device may have: each is an index entry and a possible
/// argon2 hash per write.
pub const MAX_CREDENTIALS_PER_DEVICE: usize = 64;
/// Most secrets per credentials entry.
pub const MAX_SECRETS_PER_CREDENTIALS: usize = 16;

/// Failures of a management operation.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    /// The request is well-formed JSON but breaks a rule of the API.
    #[error("{0}")]
    BadRequest(String),
    /// Storage refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hashing pool was shut down.
    #[error("password hashing is unavailable")]
    PoolClosed,
    /// Too many hashes are already waiting for the pool.
    #[error("password hashing is overloaded; retry later")]
    Busy,
    /// The tenant's `registration-limits` do not allow it (HTTP 403, as Hono).
    #[error("{0}")]
    LimitReached(String),
}

impl From<PasswordError> for ManagementError {
    fn from(e: PasswordError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<PoolError> for ManagementError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Busy => Self::Busy,
            PoolError::Closed => Self::PoolClosed,
        }
    }
}

/// Management operations over a store; cheap to clone.
#[derive(Clone)]
pub struct Management {
    store: Arc<dyn RegistryStore>,
    pool: HashPool,
}

impl Management {
    /// Management over `store`, hashing new passwords on `pool`.
    pub fn new(store: Arc<dyn RegistryStore>, pool: HashPool) -> Self {
        Self { store, pool }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn RegistryStore> {
        &self.store
    }

    /// Creates a tenant (`id` generated if `None`); returns (id, version).
    ///
    /// # Errors
    /// `BadRequest` for invalid adapter lists or trusted CAs (undecodable `cert` or
    /// `subject-dn-bytes`, `ocsp-revocation-enabled: true`); store errors
    /// (`AlreadyExists`, `CaSubjectInUse`).
    pub async fn create_tenant(
        &self,
        id: Option<TenantId>,
        mut tenant: Tenant,
    ) -> Result<(TenantId, String), ManagementError> {
        normalize_tenant(&mut tenant)?;
        let id = match id {
            Some(id) => id,
            None => TenantId::new(uuid::Uuid::new_v4().to_string())
                .map_err(|e| ManagementError::BadRequest(e.to_string()))?,
        };
        let v = self.store.create_tenant(&id, &tenant).await?;
        Ok((id, v))
    }

    /// Replaces a tenant.
    ///
    /// # Errors
    /// `BadRequest` (as for create); store errors (`NotFound`, `VersionMismatch`,
    /// `CaSubjectInUse`).
    pub async fn update_tenant(
        &self,
        id: &TenantId,
        mut tenant: Tenant,
        if_match: Option<&str>,
    ) -> Result<String, ManagementError> {
        normalize_tenant(&mut tenant)?;
        Ok(self.store.update_tenant(id, &tenant, if_match).await?)
    }

    /// Creates a device in an existing tenant; returns (id, version).
    ///
    /// # Errors
    /// Store errors (`NotFound` for the tenant, `AlreadyExists`).
    pub async fn create_device(
        &self,
        tenant: &TenantId,
        id: Option<DeviceId>,
        mut device: Device,
    ) -> Result<(DeviceId, String), ManagementError> {
        let id = match id {
            Some(id) => id,
            None => DeviceId::new(uuid::Uuid::new_v4().to_string())
                .map_err(|e| ManagementError::BadRequest(e.to_string()))?,
        };
        if let Some(max) = self.limits(tenant).await?.and_then(|l| limit(l.max_devices)) {
            // Counted from storage: concurrent creates may pass the limit by their number.
            if self.store.list_devices(tenant).await?.len() as u64 >= max {
                metrics::counter!("ferrule_tenant_limit_refusals_total", "tenant" => tenant.to_string(), "adapter" => "registry", "limit" => "max_devices").increment(1);
                return Err(ManagementError::LimitReached(format!(
                    "the tenant's registration limit of {max} devices is reached"
                )));
            }
        }
        // `status` is read-only: whatever the client sent is replaced.
        device.status = Some(DeviceStatus { created: Some(Utc::now()), ..Default::default() });
        let v = self.store.create_device(tenant, &id, &device).await?;
        Ok((id, v))
    }

    /// Replaces a device, keeping its creation time.
    ///
    /// # Errors
    /// Store errors (`NotFound`, `VersionMismatch`).
    pub async fn update_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        mut device: Device,
        if_match: Option<&str>,
    ) -> Result<String, ManagementError> {
        let stored = self.store.get_device(tenant, id).await?;
        let created = stored.and_then(|d| d.value.status).and_then(|s| s.created);
        device.status =
            Some(DeviceStatus { created, updated: Some(Utc::now()), ..Default::default() });
        Ok(self.store.update_device(tenant, id, &device, if_match).await?)
    }

    /// A device's credentials with all confidential material removed.
    ///
    /// # Errors
    /// Store errors.
    pub async fn get_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<Versioned<Vec<Credentials>>>, ManagementError> {
        Ok(self.store.get_credentials(tenant, device).await?.map(|v| Versioned {
            version: v.version,
            value: v.value.iter().map(Credentials::redacted).collect(),
        }))
    }

    /// Replaces a device's credentials (Hono's `setAllCredentials`): secrets carrying
    /// only the `id` of an existing secret keep its confidential properties; `pwd-plain`
    /// is hashed with argon2id; new secrets get an id.
    ///
    /// # Errors
    /// `BadRequest` for invalid secrets or unknown secret ids; store errors.
    pub async fn set_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        creds: Vec<Credentials>,
        if_match: Option<&str>,
    ) -> Result<String, ManagementError> {
        let existing = self
            .store
            .get_credentials(tenant, device)
            .await?
            .ok_or(StoreError::NotFound("device"))?;
        let max = self.limits(tenant).await?.and_then(|l| limit(l.max_credentials_per_device));
        if let Some(max) = max.filter(|max| creds.len() as u64 > *max) {
            metrics::counter!("ferrule_tenant_limit_refusals_total", "tenant" => tenant.to_string(), "adapter" => "registry", "limit" => "max_credentials_per_device").increment(1);
            return Err(ManagementError::LimitReached(format!(
                "the tenant's registration limit of {max} credentials per device is exceeded"
            )));
        }
        let mut creds = merge_and_validate(creds, &existing.value)?;
        // Hash plain passwords off the async threads, bounded by the pool.
        let needs_hashing = creds.iter().any(|c| match c {
            Credentials::HashedPassword(p) => p.secrets.iter().any(|s| s.pwd_plain.is_some()),
            _ => false,
        });
        if needs_hashing {
            creds = self.pool.run(move || hash_plain_passwords(creds)).await??;
        }
        // If-Match is checked against the version read above inside the store's atomic write.
        Ok(self.store.set_credentials(tenant, device, &creds, if_match).await?)
    }
}

impl Management {
    /// The tenant's registration limits (`None`: none set).
    async fn limits(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<crate::model::RegistrationLimits>, ManagementError> {
        let stored = self.store.get_tenant(tenant).await?;
        Ok(stored.and_then(|t| t.value.registration_limits))
    }
}

/// A registration limit's value: `None` for -1 or absent (no limit).
fn limit(value: Option<i64>) -> Option<u64> {
    value.and_then(|v| u64::try_from(v).ok())
}

fn normalize_tenant(t: &mut Tenant) -> Result<(), ManagementError> {
    if let Some(alias) = &t.alias {
        // An LDH label, as the spec's description requires.
        if alias.is_empty()
            || !alias.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("alias must consist of lower case letters, digits and hyphens"));
        }
    }
    if let Some(limits) = &t.resource_limits {
        for key in [crate::model::RATE_EXT, crate::model::DEVICE_RATE_EXT] {
            let value = limits.ext.as_ref().and_then(|ext| ext.get(key));
            let valid =
                value.is_none_or(|v| v.as_u64().is_some_and(|n| n > 0 && u32::try_from(n).is_ok()));
            if !valid {
                return Err(bad(format!("resource-limits ext {key} must be a positive integer")));
            }
        }
        let periods = [
            limits.data_volume.as_ref().and_then(|d| d.period.as_ref()),
            limits.connection_duration.as_ref().and_then(|d| d.period.as_ref()),
        ];
        for p in periods.into_iter().flatten() {
            if p.no_of_days.is_some_and(|n| n < 1) {
                return Err(bad("period no-of-days must be at least 1"));
            }
            match (p.mode.as_str(), p.no_of_days) {
                ("monthly", _) | ("days", Some(_)) => {}
                ("days", None) => return Err(bad("period mode days needs no-of-days")),
                _ => return Err(bad("period mode must be days or monthly")),
            }
        }
    }
    for ca in t.trusted_ca.iter().flatten() {
        let fields = [
            ("subject-dn-bytes", &ca.subject_dn_bytes),
            ("public-key", &ca.public_key),
            ("cert", &ca.cert),
            ("ocsp-responder-cert", &ca.ocsp_responder_cert),
        ];
        for (name, v) in fields {
            if v.as_deref().is_some_and(|v| decode_b64(v).is_none()) {
                return Err(bad(format!("trusted-ca {name} is not valid base64")));
            }
        }
        // Accepting the flag would promise revocation checks that never happen.
        if ca.ocsp_revocation_enabled {
            return Err(bad(
                "trusted-ca ocsp-revocation-enabled: OCSP revocation checking is not \
                 implemented; remove the property or set it to false",
            ));
        }
        // The subject is what makes the CA unique across tenants (checked by the store)
        // and what client certificates' issuers are matched against.
        crate::x509::trusted_ca_subject(ca).map_err(bad)?;
    }
    if let Some(adapters) = &t.adapters {
        if adapters.is_empty() {
            return Err(ManagementError::BadRequest(
                "adapters must not be empty if present".into(),
            ));
        }
        for (i, a) in adapters.iter().enumerate() {
            if adapters[..i].iter().any(|b| b.r#type == a.r#type) {
                return Err(ManagementError::BadRequest(format!(
                    "adapter type {:?} is configured twice",
                    a.r#type
                )));
            }
        }
    }
    if let Some(cas) = &mut t.trusted_ca {
        for ca in cas.iter_mut() {
            if ca.id.is_none() {
                ca.id = Some(uuid::Uuid::new_v4().to_string());
            }
        }
    }
    Ok(())
}

fn bad(msg: impl Into<String>) -> ManagementError {
    ManagementError::BadRequest(msg.into())
}

/// Applies patch-mode merges and checks every rule that does not need hashing.
fn merge_and_validate(
    mut creds: Vec<Credentials>,
    existing: &[Credentials],
) -> Result<Vec<Credentials>, ManagementError> {
    if creds.len() > MAX_CREDENTIALS_PER_DEVICE {
        return Err(bad(format!("at most {MAX_CREDENTIALS_PER_DEVICE} credentials per device")));
    }
    for c in &mut creds {
        let old =
            existing.iter().find(|e| e.cred_type() == c.cred_type() && e.auth_id() == c.auth_id());
        match c {
            Credentials::HashedPassword(p) => {
                check_entry(&p.auth_id, p.secrets.len())?;
                let old = match old {
                    Some(Credentials::HashedPassword(o)) => &o.secrets[..],
                    _ => &[],
                };
                for s in &mut p.secrets {
                    check_window(&s.meta)?;
                    if s.salt.as_deref().is_some_and(|v| decode_b64(v).is_none()) {
                        return Err(PasswordError::BadSalt.into());
                    }
                    let has_material = s.pwd_plain.is_some() || s.pwd_hash.is_some();
                    if let Some(prev) = patched_secret(&mut s.meta, old)? {
                        if !has_material {
                            s.hash_function = prev.hash_function.clone();
                            s.pwd_hash = prev.pwd_hash.clone();
                            s.salt = prev.salt.clone();
                            continue;
                        }
                    }
                    if s.pwd_plain.is_some() {
                        // Hashed later; user-provided hash properties are ignored (Hono).
                        s.hash_function = None;
                        s.pwd_hash = None;
                        s.salt = None;
                    } else {
                        match (&s.hash_function, &s.pwd_hash) {
                            (Some(f), Some(h)) => {
                                password::validate_imported(f, h, s.salt.as_deref())?
                            }
                            _ => return Err(PasswordError::Missing.into()),
                        }
                    }
                }
            }
            Credentials::Psk(p) => {
                let old = if let Some(Credentials::Psk(o)) = old { &o.secrets[..] } else { &[] };
                merge_secrets(p, old, |s, prev| {
                    if let Some(prev) = prev.filter(|_| s.key.is_none()) {
                        s.key = prev.key.clone();
                    }
                    match &s.key {
                        Some(k) if decode_b64(k).is_some_and(|k| !k.is_empty()) => Ok(()),
                        _ => Err(bad("a psk secret needs a non-empty base64 key")),
                    }
                })?;
            }
            Credentials::X509Cert(x) => {
                // Like Hono: a given certificate (base64 DER) yields the auth-id (its
                // subject DN) and is not stored.
                if let Some(cert) = x.cert.take() {
                    let der = decode_b64(&cert)
                        .ok_or_else(|| bad("x509-cert cert is not valid base64"))?;
                    let subject = crate::x509::subject_dn(&der)
                        .ok_or_else(|| bad("x509-cert cert is not a DER X.509 certificate"))?;
                    if x.auth_id.as_deref().is_some_and(|a| a != subject) {
                        return Err(bad(format!(
                            "x509-cert auth-id does not match the certificate's subject DN {subject}"
                        )));
                    }
                    x.auth_id = Some(subject);
                }
                if x.auth_id.as_deref().is_none_or(str::is_empty) {
                    return Err(bad("x509-cert credentials need an auth-id (subject DN)"));
                }
                if x.secrets.as_ref().is_some_and(|v| v.len() != 1) {
                    return Err(bad(
                        "x509-cert credentials have exactly one secret if secrets are given",
                    ));
                }
                for s in x.secrets.iter_mut().flatten() {
                    check_window(&s.meta)?;
                    if s.meta.id.is_none() {
                        s.meta.id = Some(uuid::Uuid::new_v4().to_string());
                    }
                }
            }
            Credentials::Rpk(r) => {
                let old = if let Some(Credentials::Rpk(o)) = old { &o.secrets[..] } else { &[] };
                merge_secrets(r, old, |s, prev| {
                    if let Some(prev) = prev.filter(|_| s.key.is_none() && s.cert.is_none()) {
                        s.key = prev.key.clone();
                        s.algorithm = prev.algorithm.clone();
                    }
                    for (name, v) in [("key", &s.key), ("cert", &s.cert)] {
                        if v.as_deref().is_some_and(|v| decode_b64(v).is_none()) {
                            return Err(bad(format!("rpk secret {name} is not valid base64")));
                        }
                    }
                    // Certificates are not parsed: keep only key + algorithm.
                    s.cert = None;
                    Ok(())
                })?;
            }
        }
        // Secret ids must be unique within an entry so patch updates are unambiguous.
        let ids: Vec<Option<&String>> = c.secret_meta().iter().map(|m| m.id.as_ref()).collect();
        for (i, id) in ids.iter().enumerate() {
            if id.is_some() && ids[..i].contains(id) {
                return Err(bad("secret ids must be unique within a credentials entry"));
            }
        }
    }
    Ok(creds)
}

/// Checks an entry's auth-id and number of secrets (at least one).
fn check_entry(auth_id: &str, secrets: usize) -> Result<(), ManagementError> {
    if secrets < 1 {
        return Err(bad("secrets must not be empty"));
    }
    if secrets > MAX_SECRETS_PER_CREDENTIALS {
        return Err(bad(format!(
            "at most {MAX_SECRETS_PER_CREDENTIALS} secrets per credentials entry"
        )));
    }
    if auth_id.is_empty() {
        return Err(bad("auth-id must not be empty"));
    }
    Ok(())
}

/// Checks an entry (auth-id, number of secrets, each secret's validity window), then
/// hands each secret to `merge` with the stored secret among `old` that it names in
/// patch mode; `merge` completes and checks the secret.
fn merge_secrets<S: AsRef<SecretMeta> + AsMut<SecretMeta>>(
    entry: &mut SecretCredentials<S>,
    old: &[S],
    mut merge: impl FnMut(&mut S, Option<&S>) -> Result<(), ManagementError>,
) -> Result<(), ManagementError> {
    check_entry(&entry.auth_id, entry.secrets.len())?;
    for s in &mut entry.secrets {
        check_window(s.as_ref())?;
        let prev = patched_secret(s.as_mut(), old)?;
        merge(s, prev)?;
    }
    Ok(())
}

/// For a secret that names an `id` (patch mode), the stored secret with that id among
/// `old`; a secret without an id is new and gets one.
fn patched_secret<'a, S: AsRef<SecretMeta>>(
    meta: &mut SecretMeta,
    old: &'a [S],
) -> Result<Option<&'a S>, ManagementError> {
    let Some(id) = &meta.id else {
        meta.id = Some(uuid::Uuid::new_v4().to_string());
        return Ok(None);
    };
    match old.iter().find(|x| x.as_ref().id.as_ref() == Some(id)) {
        Some(prev) => Ok(Some(prev)),
        None => Err(bad(format!("no existing secret with id {id:?}"))),
    }
}

fn check_window(m: &SecretMeta) -> Result<(), ManagementError> {
    match (m.not_before, m.not_after) {
        (Some(a), Some(b)) if a > b => Err(bad("not-before is after not-after")),
        _ => Ok(()),
    }
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Replaces every `pwd-plain` with an argon2id PHC string (blocking).
fn hash_plain_passwords(mut creds: Vec<Credentials>) -> Result<Vec<Credentials>, ManagementError> {
    for c in &mut creds {
        if let Credentials::HashedPassword(p) = c {
            for s in &mut p.secrets {
                if let Some(plain) = s.pwd_plain.take() {
                    s.pwd_hash = Some(password::hash_plain(&plain)?);
                    s.hash_function = Some(ARGON2ID.to_owned());
                    s.salt = None;
                }
            }
        }
    }
    Ok(creds)
}
