//! The default store: one redb file on local disk. Every operation is one redb
//! transaction on a blocking thread, so checks (version, existence, auth-id conflicts) and
//! writes are atomic; a committed write is durable (redb fsyncs on commit).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{
    decode, encode, index_keys, version_matches, Change, RegistryStore, StoreError,
    CHANGE_CHANNEL_CAPACITY,
};
use crate::model::{
    new_version, CredentialType, Credentials, Device, DeviceId, Tenant, TenantId, Versioned,
};

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const DEVICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("devices");
const CREDENTIALS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("credentials");
/// (tenant, type, auth-id) -> device id.
const CRED_INDEX: TableDefinition<(&str, &str, &str), &str> =
    TableDefinition::new("credentials_index");

fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// redb-backed [`RegistryStore`].
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    changes: broadcast::Sender<Change>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the file cannot be opened or is not a redb database.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(be)?;
        }
        let db = Database::create(path).map_err(be)?;
        let txn = db.begin_write().map_err(be)?;
        txn.open_table(TENANTS).map_err(be)?;
        txn.open_table(DEVICES).map_err(be)?;
        txn.open_table(CREDENTIALS).map_err(be)?;
        txn.open_table(CRED_INDEX).map_err(be)?;
        txn.commit().map_err(be)?;
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        Ok(Self { db: Arc::new(db), changes })
    }

    /// Runs `f` on a blocking thread with the database.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(be)?
    }

    fn announce(&self, c: Change) {
        // No receivers is fine: nobody caches yet.
        let _ = self.changes.send(c);
    }
}

fn remove_device_in(txn: &redb::WriteTransaction, t: &str, d: &str) -> Result<bool, StoreError> {
    let mut devices = txn.open_table(DEVICES).map_err(be)?;
    let existed = devices.remove((t, d)).map_err(be)?.is_some();
    let mut creds = txn.open_table(CREDENTIALS).map_err(be)?;
    let old = creds.remove((t, d)).map_err(be)?.map(|v| v.value().to_vec());
    if let Some(old) = old {
        let old: Versioned<Vec<Credentials>> = decode(&old)?;
        let mut idx = txn.open_table(CRED_INDEX).map_err(be)?;
        for c in &old.value {
            idx.remove((t, c.cred_type().as_str(), c.auth_id())).map_err(be)?;
        }
    }
    Ok(existed)
}

fn device_ids_of(txn: &redb::WriteTransaction, t: &str) -> Result<Vec<String>, StoreError> {
    let devices = txn.open_table(DEVICES).map_err(be)?;
    let mut ids = Vec::new();
    for entry in devices.range((t, "")..).map_err(be)? {
        let (k, _) = entry.map_err(be)?;
        let (kt, kd) = k.value();
        if kt != t {
            break;
        }
        ids.push(kd.to_owned());
    }
    Ok(ids)
}

#[async_trait]
impl RegistryStore for EmbeddedStore {
    async fn create_tenant(&self, id: &TenantId, tenant: &Tenant) -> Result<String, StoreError> {
        let version = new_version();
        let rec = encode(&Versioned { version: version.clone(), value: tenant.clone() })?;
        let key = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let mut t = txn.open_table(TENANTS).map_err(be)?;
                if t.get(key.as_str()).map_err(be)?.is_some() {
                    return Err(StoreError::AlreadyExists("tenant"));
                }
                t.insert(key.as_str(), rec.as_slice()).map_err(be)?;
            }
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Tenant(id.clone()));
        Ok(version)
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Versioned<Tenant>>, StoreError> {
        let key = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(be)?;
            let t = txn.open_table(TENANTS).map_err(be)?;
            t.get(key.as_str()).map_err(be)?.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn update_tenant(
        &self,
        id: &TenantId,
        tenant: &Tenant,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let version = new_version();
        let rec = encode(&Versioned { version: version.clone(), value: tenant.clone() })?;
        let key = id.to_string();
        let if_match = if_match.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let mut t = txn.open_table(TENANTS).map_err(be)?;
                let cur: Versioned<Tenant> = match t.get(key.as_str()).map_err(be)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(StoreError::NotFound("tenant")),
                };
                if !version_matches(if_match.as_deref(), &cur.version) {
                    return Err(StoreError::VersionMismatch);
                }
                t.insert(key.as_str(), rec.as_slice()).map_err(be)?;
            }
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Tenant(id.clone()));
        Ok(version)
    }

    async fn delete_tenant(&self, id: &TenantId, if_match: Option<&str>) -> Result<(), StoreError> {
        let key = id.to_string();
        let if_match = if_match.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let mut t = txn.open_table(TENANTS).map_err(be)?;
                let cur: Versioned<Tenant> = match t.get(key.as_str()).map_err(be)? {
                    Some(v) => decode(v.value())?,
                    None => return Err(StoreError::NotFound("tenant")),
                };
                if !version_matches(if_match.as_deref(), &cur.version) {
                    return Err(StoreError::VersionMismatch);
                }
                t.remove(key.as_str()).map_err(be)?;
            }
            for d in device_ids_of(&txn, &key)? {
                remove_device_in(&txn, &key, &d)?;
            }
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Tenant(id.clone()));
        Ok(())
    }

    async fn list_tenants(&self) -> Result<Vec<(TenantId, Versioned<Tenant>)>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(be)?;
            let t = txn.open_table(TENANTS).map_err(be)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(be)? {
                let (k, v) = entry.map_err(be)?;
                let id =
                    TenantId::new(k.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push((id, decode(v.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn create_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        device: &Device,
    ) -> Result<String, StoreError> {
        let version = new_version();
        let rec = encode(&Versioned { version: version.clone(), value: device.clone() })?;
        let creds =
            encode(&Versioned { version: new_version(), value: Vec::<Credentials>::new() })?;
        let (t, d) = (tenant.to_string(), id.to_string());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let tenants = txn.open_table(TENANTS).map_err(be)?;
                if tenants.get(t.as_str()).map_err(be)?.is_none() {
                    return Err(StoreError::NotFound("tenant"));
                }
                let mut devices = txn.open_table(DEVICES).map_err(be)?;
                if devices.get((t.as_str(), d.as_str())).map_err(be)?.is_some() {
                    return Err(StoreError::AlreadyExists("device"));
                }
                devices.insert((t.as_str(), d.as_str()), rec.as_slice()).map_err(be)?;
                let mut c = txn.open_table(CREDENTIALS).map_err(be)?;
                c.insert((t.as_str(), d.as_str()), creds.as_slice()).map_err(be)?;
            }
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Device(tenant.clone(), id.clone()));
        Ok(version)
    }

    async fn get_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
    ) -> Result<Option<Versioned<Device>>, StoreError> {
        let (t, d) = (tenant.to_string(), id.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(be)?;
            let devices = txn.open_table(DEVICES).map_err(be)?;
            devices
                .get((t.as_str(), d.as_str()))
                .map_err(be)?
                .map(|v| decode(v.value()))
                .transpose()
        })
        .await
    }

    async fn update_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        device: &Device,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let version = new_version();
        let rec = encode(&Versioned { version: version.clone(), value: device.clone() })?;
        let (t, d) = (tenant.to_string(), id.to_string());
        let if_match = if_match.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let mut devices = txn.open_table(DEVICES).map_err(be)?;
                let cur: Versioned<Device> =
                    match devices.get((t.as_str(), d.as_str())).map_err(be)? {
                        Some(v) => decode(v.value())?,
                        None => return Err(StoreError::NotFound("device")),
                    };
                if !version_matches(if_match.as_deref(), &cur.version) {
                    return Err(StoreError::VersionMismatch);
                }
                devices.insert((t.as_str(), d.as_str()), rec.as_slice()).map_err(be)?;
            }
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Device(tenant.clone(), id.clone()));
        Ok(version)
    }

    async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        if_match: Option<&str>,
    ) -> Result<(), StoreError> {
        let (t, d) = (tenant.to_string(), id.to_string());
        let if_match = if_match.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let devices = txn.open_table(DEVICES).map_err(be)?;
                let cur: Versioned<Device> =
                    match devices.get((t.as_str(), d.as_str())).map_err(be)? {
                        Some(v) => decode(v.value())?,
                        None => return Err(StoreError::NotFound("device")),
                    };
                if !version_matches(if_match.as_deref(), &cur.version) {
                    return Err(StoreError::VersionMismatch);
                }
            }
            remove_device_in(&txn, &t, &d)?;
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Device(tenant.clone(), id.clone()));
        Ok(())
    }

    async fn list_devices(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(DeviceId, Versioned<Device>)>, StoreError> {
        let t = tenant.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(be)?;
            let devices = txn.open_table(DEVICES).map_err(be)?;
            let mut out = Vec::new();
            for entry in devices.range((t.as_str(), "")..).map_err(be)? {
                let (k, v) = entry.map_err(be)?;
                let (kt, kd) = k.value();
                if kt != t {
                    break;
                }
                let id = DeviceId::new(kd).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                out.push((id, decode(v.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn delete_devices_of_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let t = tenant.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let tenants = txn.open_table(TENANTS).map_err(be)?;
                if tenants.get(t.as_str()).map_err(be)?.is_none() {
                    return Err(StoreError::NotFound("tenant"));
                }
            }
            for d in device_ids_of(&txn, &t)? {
                remove_device_in(&txn, &t, &d)?;
            }
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Tenant(tenant.clone()));
        Ok(())
    }

    async fn get_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<Versioned<Vec<Credentials>>>, StoreError> {
        let (t, d) = (tenant.to_string(), device.to_string());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(be)?;
            let c = txn.open_table(CREDENTIALS).map_err(be)?;
            c.get((t.as_str(), d.as_str())).map_err(be)?.map(|v| decode(v.value())).transpose()
        })
        .await
    }

    async fn set_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        credentials: &[Credentials],
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let keys = index_keys(credentials)?;
        let version = new_version();
        let rec = encode(&Versioned { version: version.clone(), value: credentials.to_vec() })?;
        let (t, d) = (tenant.to_string(), device.to_string());
        let if_match = if_match.map(str::to_owned);
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(be)?;
            {
                let mut c = txn.open_table(CREDENTIALS).map_err(be)?;
                let cur: Versioned<Vec<Credentials>> =
                    match c.get((t.as_str(), d.as_str())).map_err(be)? {
                        Some(v) => decode(v.value())?,
                        None => return Err(StoreError::NotFound("device")),
                    };
                if !version_matches(if_match.as_deref(), &cur.version) {
                    return Err(StoreError::VersionMismatch);
                }
                let mut idx = txn.open_table(CRED_INDEX).map_err(be)?;
                for (ty, auth_id) in &keys {
                    if let Some(owner) =
                        idx.get((t.as_str(), ty.as_str(), auth_id.as_str())).map_err(be)?
                    {
                        if owner.value() != d {
                            return Err(StoreError::Conflict(format!(
                                "{ty} credentials with this auth-id belong to another device"
                            )));
                        }
                    }
                }
                for old in &cur.value {
                    idx.remove((t.as_str(), old.cred_type().as_str(), old.auth_id()))
                        .map_err(be)?;
                }
                for (ty, auth_id) in &keys {
                    idx.insert((t.as_str(), ty.as_str(), auth_id.as_str()), d.as_str())
                        .map_err(be)?;
                }
                c.insert((t.as_str(), d.as_str()), rec.as_slice()).map_err(be)?;
            }
            txn.commit().map_err(be)
        })
        .await?;
        self.announce(Change::Device(tenant.clone(), device.clone()));
        Ok(version)
    }

    async fn find_credentials(
        &self,
        tenant: &TenantId,
        cred_type: CredentialType,
        auth_id: &str,
    ) -> Result<Option<(DeviceId, Credentials)>, StoreError> {
        let (t, a) = (tenant.to_string(), auth_id.to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(be)?;
            let idx = txn.open_table(CRED_INDEX).map_err(be)?;
            let Some(dev) = idx.get((t.as_str(), cred_type.as_str(), a.as_str())).map_err(be)?
            else {
                return Ok(None);
            };
            let dev = dev.value().to_owned();
            let c = txn.open_table(CREDENTIALS).map_err(be)?;
            let Some(rec) = c.get((t.as_str(), dev.as_str())).map_err(be)? else {
                return Ok(None);
            };
            let set: Versioned<Vec<Credentials>> = decode(rec.value())?;
            let found =
                set.value.into_iter().find(|c| c.cred_type() == cred_type && c.auth_id() == a);
            let id = DeviceId::new(dev).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(found.map(|c| (id, c)))
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}
