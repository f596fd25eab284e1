//! The default store: one redb file on local disk. Every operation is one redb
//! transaction on a blocking thread, so checks (version, existence, auth-id conflicts) and
//! writes are atomic; a committed write is durable (redb fsyncs on commit).

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;

use super::{
    be, ca_subject_in_use, ca_subjects, corrupt, decode, index_keys, new_record, version_matches,
    Change, RegistryStore, StoreError, CHANGE_CHANNEL_CAPACITY,
};
use crate::model::{CredentialType, Credentials, Device, DeviceId, Tenant, TenantId, Versioned};

const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const DEVICES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("devices");
const CREDENTIALS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("credentials");
/// (tenant, type, auth-id) -> device id.
const CRED_INDEX: TableDefinition<(&str, &str, &str), &str> =
    TableDefinition::new("credentials_index");

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
            ferrule_net::private::create_dir(parent).map_err(be)?;
        }
        let db = Database::create(path).map_err(be)?;
        ferrule_net::private::restrict_file(path).map_err(be)?;
        let txn = db.begin_write().map_err(be)?;
        txn.open_table(TENANTS).map_err(be)?;
        txn.open_table(DEVICES).map_err(be)?;
        txn.open_table(CREDENTIALS).map_err(be)?;
        txn.open_table(CRED_INDEX).map_err(be)?;
        txn.commit().map_err(be)?;
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        Ok(Self { db: Arc::new(db), changes })
    }

    /// Runs `f` in a read transaction on a blocking thread.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db.begin_read().map_err(be)?)).await.map_err(be)?
    }

    /// As [`Self::write`], for a write that stores `value` as a new version: `f` gets its
    /// record. Returns the version.
    async fn write_record<T: Serialize>(
        &self,
        value: &T,
        change: Change,
        f: impl FnOnce(&WriteTransaction, &[u8]) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<String, StoreError> {
        let (version, rec) = new_record(value)?;
        self.write(change, move |txn| f(txn, &rec)).await?;
        Ok(version)
    }

    /// Runs `f` in a write transaction on a blocking thread and commits it if `f` succeeds;
    /// then announces `change`.
    async fn write(
        &self,
        change: Change,
        f: impl FnOnce(&WriteTransaction) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(be)?;
            f(&txn)?;
            txn.commit().map_err(be)
        })
        .await
        .map_err(be)??;
        // No receivers is fine: nobody caches yet.
        let _ = self.changes.send(change);
        Ok(())
    }
}

/// The decoded record at `key`, if any.
fn get<K: redb::Key + 'static, T: DeserializeOwned>(
    table: &impl ReadableTable<K, &'static [u8]>,
    key: K::SelfType<'_>,
) -> Result<Option<T>, StoreError> {
    table.get(key).map_err(be)?.map(|v| decode(v.value())).transpose()
}

/// The record at `key` if it exists (else `NotFound(what)`) and `if_match` accepts its
/// version (else `VersionMismatch`).
fn current<K: redb::Key + 'static, T: DeserializeOwned>(
    table: &impl ReadableTable<K, &'static [u8]>,
    key: K::SelfType<'_>,
    if_match: Option<&str>,
    what: &'static str,
) -> Result<Versioned<T>, StoreError> {
    let cur: Versioned<T> = get(table, key)?.ok_or(StoreError::NotFound(what))?;
    if !version_matches(if_match, &cur.version) {
        return Err(StoreError::VersionMismatch);
    }
    Ok(cur)
}

/// Refuses (`CaSubjectInUse`) if a tenant other than `id` in `tenants` trusts one of the
/// CA subjects `mine` ([`ca_subjects`]). Runs inside the write transaction that stores
/// tenant `id`: redb serialises write transactions, so two writes cannot both pass.
fn ca_subjects_free(
    tenants: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
    mine: &[(String, String)],
) -> Result<(), StoreError> {
    if mine.is_empty() {
        return Ok(());
    }
    for entry in tenants.iter().map_err(be)? {
        let (k, v) = entry.map_err(be)?;
        if k.value() != id {
            let other: Versioned<Tenant> = decode(v.value())?;
            ca_subject_in_use(mine, &other.value)?;
        }
    }
    Ok(())
}

fn tenant_exists(txn: &WriteTransaction, t: &str) -> Result<(), StoreError> {
    let tenants = txn.open_table(TENANTS).map_err(be)?;
    if tenants.get(t).map_err(be)?.is_none() {
        return Err(StoreError::NotFound("tenant"));
    }
    Ok(())
}

fn remove_device_in(txn: &WriteTransaction, t: &str, d: &str) -> Result<bool, StoreError> {
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

/// Removes every device (and its credentials) of tenant `t`.
fn remove_devices_of(txn: &WriteTransaction, t: &str) -> Result<(), StoreError> {
    let mut ids = Vec::new();
    for entry in txn.open_table(DEVICES).map_err(be)?.range((t, "")..).map_err(be)? {
        let (k, _) = entry.map_err(be)?;
        let (kt, kd) = k.value();
        if kt != t {
            break;
        }
        ids.push(kd.to_owned());
    }
    for d in ids {
        remove_device_in(txn, t, &d)?;
    }
    Ok(())
}

#[async_trait]
impl RegistryStore for EmbeddedStore {
    async fn create_tenant(&self, id: &TenantId, tenant: &Tenant) -> Result<String, StoreError> {
        let (key, cas) = (id.to_string(), ca_subjects(tenant));
        self.write_record(tenant, Change::Tenant(id.clone()), move |txn, rec| {
            let mut t = txn.open_table(TENANTS).map_err(be)?;
            if t.get(key.as_str()).map_err(be)?.is_some() {
                return Err(StoreError::AlreadyExists("tenant"));
            }
            ca_subjects_free(&t, &key, &cas)?;
            t.insert(key.as_str(), rec).map_err(be)?;
            Ok(())
        })
        .await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Versioned<Tenant>>, StoreError> {
        let key = id.to_string();
        self.read(move |txn| get(&txn.open_table(TENANTS).map_err(be)?, key.as_str())).await
    }

    async fn update_tenant(
        &self,
        id: &TenantId,
        tenant: &Tenant,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let (key, if_match) = (id.to_string(), if_match.map(str::to_owned));
        let cas = ca_subjects(tenant);
        self.write_record(tenant, Change::Tenant(id.clone()), move |txn, rec| {
            let mut t = txn.open_table(TENANTS).map_err(be)?;
            current::<_, Tenant>(&t, key.as_str(), if_match.as_deref(), "tenant")?;
            ca_subjects_free(&t, &key, &cas)?;
            t.insert(key.as_str(), rec).map_err(be)?;
            Ok(())
        })
        .await
    }

    async fn delete_tenant(&self, id: &TenantId, if_match: Option<&str>) -> Result<(), StoreError> {
        let (key, if_match) = (id.to_string(), if_match.map(str::to_owned));
        self.write(Change::Tenant(id.clone()), move |txn| {
            let mut t = txn.open_table(TENANTS).map_err(be)?;
            current::<_, Tenant>(&t, key.as_str(), if_match.as_deref(), "tenant")?;
            t.remove(key.as_str()).map_err(be)?;
            remove_devices_of(txn, &key)
        })
        .await
    }

    async fn list_tenants(&self) -> Result<Vec<(TenantId, Versioned<Tenant>)>, StoreError> {
        self.read(|txn| {
            let mut out = Vec::new();
            for entry in txn.open_table(TENANTS).map_err(be)?.iter().map_err(be)? {
                let (k, v) = entry.map_err(be)?;
                out.push((TenantId::new(k.value()).map_err(corrupt)?, decode(v.value())?));
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
        let (_, creds) = new_record(&Vec::<Credentials>::new())?;
        let (t, d) = (tenant.to_string(), id.to_string());
        self.write_record(device, Change::Device(tenant.clone(), id.clone()), move |txn, rec| {
            tenant_exists(txn, &t)?;
            let mut devices = txn.open_table(DEVICES).map_err(be)?;
            if devices.get((t.as_str(), d.as_str())).map_err(be)?.is_some() {
                return Err(StoreError::AlreadyExists("device"));
            }
            devices.insert((t.as_str(), d.as_str()), rec).map_err(be)?;
            let mut c = txn.open_table(CREDENTIALS).map_err(be)?;
            c.insert((t.as_str(), d.as_str()), creds.as_slice()).map_err(be)?;
            Ok(())
        })
        .await
    }

    async fn get_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
    ) -> Result<Option<Versioned<Device>>, StoreError> {
        let (t, d) = (tenant.to_string(), id.to_string());
        self.read(move |txn| get(&txn.open_table(DEVICES).map_err(be)?, (t.as_str(), d.as_str())))
            .await
    }

    async fn update_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        device: &Device,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let (t, d) = (tenant.to_string(), id.to_string());
        let if_match = if_match.map(str::to_owned);
        self.write_record(device, Change::Device(tenant.clone(), id.clone()), move |txn, rec| {
            let mut devices = txn.open_table(DEVICES).map_err(be)?;
            let key = (t.as_str(), d.as_str());
            current::<_, Device>(&devices, key, if_match.as_deref(), "device")?;
            devices.insert(key, rec).map_err(be)?;
            Ok(())
        })
        .await
    }

    async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        if_match: Option<&str>,
    ) -> Result<(), StoreError> {
        let (t, d) = (tenant.to_string(), id.to_string());
        let if_match = if_match.map(str::to_owned);
        self.write(Change::Device(tenant.clone(), id.clone()), move |txn| {
            let devices = txn.open_table(DEVICES).map_err(be)?;
            current::<_, Device>(
                &devices,
                (t.as_str(), d.as_str()),
                if_match.as_deref(),
                "device",
            )?;
            drop(devices); // `remove_device_in` opens it again.
            remove_device_in(txn, &t, &d)?;
            Ok(())
        })
        .await
    }

    async fn list_devices(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(DeviceId, Versioned<Device>)>, StoreError> {
        let t = tenant.to_string();
        self.read(move |txn| {
            let mut out = Vec::new();
            for entry in
                txn.open_table(DEVICES).map_err(be)?.range((t.as_str(), "")..).map_err(be)?
            {
                let (k, v) = entry.map_err(be)?;
                let (kt, kd) = k.value();
                if kt != t {
                    break;
                }
                out.push((DeviceId::new(kd).map_err(corrupt)?, decode(v.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn delete_devices_of_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let t = tenant.to_string();
        self.write(Change::Tenant(tenant.clone()), move |txn| {
            tenant_exists(txn, &t)?;
            remove_devices_of(txn, &t)
        })
        .await
    }

    async fn get_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<Versioned<Vec<Credentials>>>, StoreError> {
        let (t, d) = (tenant.to_string(), device.to_string());
        self.read(move |txn| {
            get(&txn.open_table(CREDENTIALS).map_err(be)?, (t.as_str(), d.as_str()))
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
        let (t, d) = (tenant.to_string(), device.to_string());
        let if_match = if_match.map(str::to_owned);
        let change = Change::Device(tenant.clone(), device.clone());
        self.write_record(&credentials, change, move |txn, rec| {
            let mut c = txn.open_table(CREDENTIALS).map_err(be)?;
            let key = (t.as_str(), d.as_str());
            let cur: Versioned<Vec<Credentials>> = current(&c, key, if_match.as_deref(), "device")?;
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
                idx.remove((t.as_str(), old.cred_type().as_str(), old.auth_id())).map_err(be)?;
            }
            for (ty, auth_id) in &keys {
                idx.insert((t.as_str(), ty.as_str(), auth_id.as_str()), d.as_str()).map_err(be)?;
            }
            c.insert(key, rec).map_err(be)?;
            Ok(())
        })
        .await
    }

    async fn find_credentials(
        &self,
        tenant: &TenantId,
        cred_type: CredentialType,
        auth_id: &str,
    ) -> Result<Option<(DeviceId, Credentials)>, StoreError> {
        let (t, a) = (tenant.to_string(), auth_id.to_owned());
        self.read(move |txn| {
            let idx = txn.open_table(CRED_INDEX).map_err(be)?;
            let Some(dev) = idx.get((t.as_str(), cred_type.as_str(), a.as_str())).map_err(be)?
            else {
                return Ok(None);
            };
            let dev = dev.value().to_owned();
            let c = txn.open_table(CREDENTIALS).map_err(be)?;
            let Some(set) = get::<_, Versioned<Vec<Credentials>>>(&c, (t.as_str(), dev.as_str()))?
            else {
                return Ok(None);
            };
            let found =
                set.value.into_iter().find(|c| c.cred_type() == cred_type && c.auth_id() == a);
            let id = DeviceId::new(dev).map_err(corrupt)?;
            Ok(found.map(|c| (id, c)))
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}
