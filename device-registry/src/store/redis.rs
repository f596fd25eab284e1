//! Redis store for multi-instance deployments, on one Redis server or a Redis Cluster.
//!
//! Layout under a key prefix `P` (default `ferrule:registry`), `T` a tenant id:
//! - `P:{T}:t`: tenant record (JSON `Versioned<Tenant>`);
//! - `P:{T}:d`: hash device id -> device record;
//! - `P:{T}:c`: hash device id -> credentials record;
//! - `P:{T}:i`: hash `{type}\n{auth-id}` -> device id (credentials look-up index);
//! - `P:{T}:v`: hash auth-id -> password verifier (key id and HMAC, see
//!   [`crate::verifiers`]; only with `[registry] verifier_key_file`); an auth-id's entry
//!   goes with its hashed-password credentials (replaced or deleted), all with the tenant;
//! - `P:tenants`: set of tenant ids (for listing);
//! - `P:ca-guard`: the trusted-CA guard (below);
//! - `P:layout`: marks a single-server store whose keys were moved to this layout;
//! - channel `P:changes`: one message per write, so other instances drop cached entries.
//!
//! `{T}` is a Redis Cluster hash tag: all keys of a tenant live in one slot (tenants spread
//! over the masters), so every script that touches one tenant is atomic on a cluster as
//! on a single server. Tenant ids cannot contain braces. A prefix with braces still works
//! (its first `{` starts the tag) but may put every tenant into one slot. One code path
//! serves both deployments; only the connection differs ([`conn::Conn`]).
//!
//! Every write of one tenant's data is one Lua script ([`scripts`]), so the version check,
//! the existence checks and the write are atomic, as in the embedded store. Versions are
//! compared inside the script against the accepted `If-Match` tags, normalised in Rust.
//!
//! The global keys (`P:tenants`, `P:ca-guard`) are in other slots, so the tenant writes
//! that touch them take several steps, ordered so that a crash or a race between any two
//! steps leaves nothing that breaks a rule:
//! - Tenant set: a member without a record is harmless (listings skip it); a record
//!   without a member would be invisible to listings and to the trusted-CA check, so it
//!   must not outlive a write. Create adds the member, writes the record, and adds the
//!   member again (a delete of the same id may have removed it in between). Delete
//!   deletes the record with the tenant's other keys, removes the member, and adds it back
//!   if the record exists again by then (a create got in between). A crash can leave a
//!   member without a record (a failed create or delete), never the reverse.
//! - Trusted-CA subject DNs unique across tenants: DNs come from DER certificates that Lua
//!   cannot parse, so the check runs in Rust over all tenants, and cannot be one script
//!   with the write. `P:ca-guard` is a sequence lock: its generation is odd while a guarded
//!   write is in flight. A create or update of a tenant with trusted CAs reads an even
//!   generation `g` (waiting while it is odd), checks all other tenants, then moves `g` to
//!   `g+1` only if it is still `g` (else it starts over), writes, and moves it to `g+2`.
//!   So no guarded write began or ended between the read and the begin, and every guarded
//!   write that ended before has its record listed: a check cannot miss a conflicting
//!   write, and of two concurrent writes of one DN one sees the other or retries. Tenant
//!   deletes take the guard too (without a check), because their remove-then-re-add of
//!   the set member could hide a tenant from a concurrent check. Writes without trusted
//!   CAs cannot create a conflict and skip the guard.
//! - A guard left odd by a crashed instance is taken as abandoned after [`GUARD_LEASE`]
//!   (Redis server time) and ended by the next reader. A writer gives up before its
//!   record write once [`GUARD_BUDGET`] (a third of the lease) has passed since its begin,
//!   so only a write that stalls in flight for longer than the lease could still race a
//!   check. Instances of versions before this layout do not know the guard (see below).
//!
//! Layout change: versions before this one used `P:t:T`, `P:d:T`, `P:c:T`, `P:i:T` (no
//! hash tags) and a `P:ca-gen` counter. On a single server, the first connect moves each
//! listed tenant's keys to the new names (one script per tenant, idempotent, so two
//! instances may run it at once), drops `P:ca-gen` and sets `P:layout`. Stop every
//! instance of an older version before starting this one: what they write afterwards is
//! in the old layout and stays invisible. (The old layout never worked on a cluster.)
//!
//! Size: the scripts are in [`scripts`], the connection and pub/sub relay in [`conn`],
//! the multi-step tenant writes in [`tenants`].

mod conn;
mod scripts;
mod tenants;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, ScriptInvocation};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use self::conn::{backend, change_message, Conn, Target};
use self::scripts::Scripts;
use super::{
    corrupt, decode, index_keys, new_record, Change, RegistryStore, StoreError,
    CHANGE_CHANNEL_CAPACITY,
};
use crate::model::{CredentialType, Credentials, Device, DeviceId, Tenant, TenantId, Versioned};

/// How long a guarded tenant write may stay in flight before other instances take it as
/// abandoned (its instance died between begin and end).
const GUARD_LEASE: Duration = Duration::from_secs(10);
/// A guarded write gives up before its record write once this has passed since it began,
/// so it cannot land after the lease ran out unless that one command stalls for long.
const GUARD_BUDGET: Duration = Duration::from_millis(3_333);

struct Inner {
    conn: Conn,
    prefix: String,
    scripts: Scripts,
    changes: broadcast::Sender<Change>,
    /// Stops the pub/sub relay task when the last handle is dropped.
    _stop: DropGuard,
}

/// Redis-backed [`RegistryStore`] (one server or a cluster); cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("cluster", &self.inner.conn.is_cluster())
            .finish_non_exhaustive()
    }
}

/// Normalises an `If-Match` value into the script's `want` argument.
fn want(if_match: Option<&str>) -> String {
    let Some(v) = if_match else {
        return String::new();
    };
    let tags: Vec<&str> = v
        .split(',')
        .map(|t| {
            let t = t.trim();
            t.strip_prefix("W/").unwrap_or(t).trim_matches('"')
        })
        .filter(|t| !t.is_empty() && !t.contains(char::is_whitespace))
        .collect();
    if tags.is_empty() {
        // Present but unusable: must match nothing, not everything.
        "\u{1}".to_owned()
    } else {
        tags.join(" ")
    }
}

fn outcome(r: &str, what: &'static str) -> Result<(), StoreError> {
    match r {
        "ok" => Ok(()),
        "exists" => Err(StoreError::AlreadyExists(what)),
        "notfound" => Err(StoreError::NotFound(what)),
        "notenant" => Err(StoreError::NotFound("tenant")),
        "mismatch" => Err(StoreError::VersionMismatch),
        "conflict" => Err(StoreError::Conflict(
            "credentials with this type and auth-id belong to another device".into(),
        )),
        other => Err(StoreError::Backend(format!("unexpected script result {other:?}"))),
    }
}

fn index_field(t: CredentialType, auth_id: &str) -> String {
    format!("{}\n{auth_id}", t.as_str())
}

impl RedisStore {
    /// Connects to one Redis server at `url` (e.g. `redis://127.0.0.1:6379/0`), moves keys
    /// of an older layout (see the module documentation) and starts relaying other
    /// instances' changes.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Self::open(Target::Single(url), prefix, &crate::RedisTls::default()).await
    }

    /// [`RedisStore::connect`], with `tls` as the trust for a `rediss://` URL.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the URL is invalid or Redis cannot be reached (or its
    /// certificate is not trusted).
    pub async fn connect_tls(
        url: &str,
        prefix: &str,
        tls: &crate::RedisTls,
    ) -> Result<Self, StoreError> {
        Self::open(Target::Single(url), prefix, tls).await
    }

    /// Connects to a Redis Cluster through its seed nodes `nodes` (URLs such as
    /// `redis://127.0.0.1:7001/`; one reachable node suffices) and starts relaying other
    /// instances' changes (subscribed on one seed node at a time).
    ///
    /// # Errors
    /// [`StoreError::Backend`] if a URL is invalid or no node can be reached.
    pub async fn connect_cluster(nodes: &[String], prefix: &str) -> Result<Self, StoreError> {
        Self::open(Target::Cluster(nodes), prefix, &crate::RedisTls::default()).await
    }

    /// [`RedisStore::connect_cluster`], with `tls` as the trust for `rediss://` nodes.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if a URL is invalid or no node can be reached (or trusted).
    pub async fn connect_cluster_tls(
        nodes: &[String],
        prefix: &str,
        tls: &crate::RedisTls,
    ) -> Result<Self, StoreError> {
        Self::open(Target::Cluster(nodes), prefix, tls).await
    }

    async fn open(
        target: Target<'_>,
        prefix: &str,
        tls: &crate::RedisTls,
    ) -> Result<Self, StoreError> {
        let (conn, subscribers) = conn::connect(target, tls).await?;
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let stop = CancellationToken::new();
        let channel = format!("{prefix}:changes");
        tokio::spawn(conn::relay_changes(subscribers, channel, changes.clone(), stop.clone()));
        let store = Self {
            inner: Arc::new(Inner {
                conn,
                prefix: prefix.to_owned(),
                scripts: Scripts::new(),
                changes,
                _stop: stop.drop_guard(),
            }),
        };
        store.migrate_layout().await?;
        Ok(store)
    }

    /// The key of `tenant`'s `kind` (`t`, `d`, `c`, `i`), in the tenant's hash tag.
    fn key(&self, kind: &str, tenant: &TenantId) -> String {
        format!("{}:{{{tenant}}}:{kind}", self.inner.prefix)
    }

    /// The keys of `tenant` for each of `kinds`, in order.
    fn keys(&self, tenant: &TenantId, kinds: &[&str]) -> Vec<String> {
        kinds.iter().map(|kind| self.key(kind, tenant)).collect()
    }

    /// A global key (`tenants`, `ca-guard`, ...).
    fn global_key(&self, name: &str) -> String {
        format!("{}:{name}", self.inner.prefix)
    }

    fn conn(&self) -> Conn {
        self.inner.conn.clone()
    }

    /// Runs `script` and returns its answer, naming `what` it did on failure.
    async fn run(&self, script: &ScriptInvocation<'_>, what: &str) -> Result<String, StoreError> {
        script.invoke_async(&mut self.conn()).await.map_err(|e| backend(what, e))
    }

    /// Runs a write script that stores `value` as a new version (its record the script's
    /// last argument, after those in `script`) as [`Self::write`] does; returns the version.
    async fn write_record<T: Serialize>(
        &self,
        mut script: ScriptInvocation<'_>,
        value: &T,
        change: Change,
    ) -> Result<String, StoreError> {
        let (version, rec) = new_record(value)?;
        script.arg(rec);
        self.write(&script, change).await?;
        Ok(version)
    }

    /// The record of `device` in the `kind` hash of `tenant`, decoded.
    async fn hget_record<T: DeserializeOwned>(
        &self,
        kind: &str,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<T>, StoreError> {
        let v: Option<Vec<u8>> = self
            .conn()
            .hget(self.key(kind, tenant), device.as_str())
            .await
            .map_err(|e| backend("reading a device record", e))?;
        v.map(|b| decode(&b)).transpose()
    }

    /// Runs a write script (keys and arguments added), maps its result (errors name the
    /// tenant or device that `change` names) and announces `change`.
    async fn write(&self, script: &ScriptInvocation<'_>, change: Change) -> Result<(), StoreError> {
        let what = match change {
            Change::Tenant(_) => "tenant",
            Change::Device(..) => "device",
            Change::All => "registry",
        };
        let r = self.run(script, "writing the registry").await?;
        outcome(&r, what)?;
        self.announce(change).await;
        Ok(())
    }

    /// Tells this instance's subscribers at once and other instances via pub/sub.
    async fn announce(&self, c: Change) {
        let _ = self.inner.changes.send(c.clone());
        let channel = self.global_key("changes");
        if let Err(e) = self.conn().publish::<_, _, ()>(channel, change_message(&c)).await {
            // The write is done; other instances fall back to their cache TTL.
            tracing::warn!(error = %e, "could not publish registry change");
        }
    }
}

#[async_trait]
impl RegistryStore for RedisStore {
    async fn create_tenant(&self, id: &TenantId, tenant: &Tenant) -> Result<String, StoreError> {
        self.create_tenant_guarded(id, tenant).await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Versioned<Tenant>>, StoreError> {
        let v: Option<Vec<u8>> =
            self.conn().get(self.key("t", id)).await.map_err(|e| backend("reading a tenant", e))?;
        v.map(|b| decode(&b)).transpose()
    }

    async fn update_tenant(
        &self,
        id: &TenantId,
        tenant: &Tenant,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        self.update_tenant_guarded(id, tenant, if_match).await
    }

    async fn delete_tenant(&self, id: &TenantId, if_match: Option<&str>) -> Result<(), StoreError> {
        self.delete_tenant_guarded(id, if_match).await
    }

    async fn list_tenants(&self) -> Result<Vec<(TenantId, Versioned<Tenant>)>, StoreError> {
        let mut ids: Vec<String> = self
            .conn()
            .smembers(self.global_key("tenants"))
            .await
            .map_err(|e| backend("listing tenants", e))?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        // MGET in bounded batches so one call never builds a huge reply (on a cluster the
        // client splits each batch by slot).
        for chunk in ids.chunks(500) {
            let tids: Vec<TenantId> = chunk
                .iter()
                .map(|i| TenantId::new(i.as_str()).map_err(corrupt))
                .collect::<Result<_, _>>()?;
            let keys: Vec<String> = tids.iter().map(|t| self.key("t", t)).collect();
            let vals: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| backend("reading tenants", e))?;
            for (t, v) in tids.into_iter().zip(vals) {
                // A member without a record (deleted meanwhile, or a write that did not
                // finish; see the module documentation) is skipped.
                if let Some(v) = v {
                    out.push((t, decode(&v)?));
                }
            }
        }
        Ok(out)
    }

    async fn create_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        device: &Device,
    ) -> Result<String, StoreError> {
        let (_, creds) = new_record(&Vec::<Credentials>::new())?;
        let mut script = self.inner.scripts.create_device.key(self.keys(tenant, &["t", "d", "c"]));
        script.arg(id.as_str()).arg(creds);
        self.write_record(script, device, Change::Device(tenant.clone(), id.clone())).await
    }

    async fn get_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
    ) -> Result<Option<Versioned<Device>>, StoreError> {
        self.hget_record("d", tenant, id).await
    }

    async fn update_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        device: &Device,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let mut script = self.inner.scripts.update_device.key(self.key("d", tenant));
        script.arg(id.as_str()).arg(want(if_match));
        self.write_record(script, device, Change::Device(tenant.clone(), id.clone())).await
    }

    async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        if_match: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut script =
            self.inner.scripts.delete_device.key(self.keys(tenant, &["d", "c", "i", "v"]));
        script.arg(id.as_str()).arg(want(if_match));
        self.write(&script, Change::Device(tenant.clone(), id.clone())).await
    }

    async fn list_devices(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(DeviceId, Versioned<Device>)>, StoreError> {
        let all: Vec<(String, Vec<u8>)> = self
            .conn()
            .hgetall(self.key("d", tenant))
            .await
            .map_err(|e| backend("listing devices", e))?;
        let mut out = all
            .into_iter()
            .map(|(k, v)| Ok((DeviceId::new(k).map_err(corrupt)?, decode(&v)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn delete_devices_of_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let keys = self.keys(tenant, &["t", "d", "c", "i", "v"]);
        let script = self.inner.scripts.delete_devices.key(keys);
        self.write(&script, Change::Tenant(tenant.clone())).await
    }

    async fn get_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<Versioned<Vec<Credentials>>>, StoreError> {
        self.hget_record("c", tenant, device).await
    }

    async fn set_credentials(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
        credentials: &[Credentials],
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        let fields: Vec<String> =
            index_keys(credentials)?.iter().map(|(t, a)| index_field(*t, a)).collect();
        let (version, rec) = new_record(&credentials)?;
        let mut script =
            self.inner.scripts.set_credentials.key(self.keys(tenant, &["c", "i", "v"]));
        script.arg(device.as_str()).arg(want(if_match)).arg(rec).arg(fields);
        self.write(&script, Change::Device(tenant.clone(), device.clone())).await?;
        Ok(version)
    }

    async fn find_credentials(
        &self,
        tenant: &TenantId,
        cred_type: CredentialType,
        auth_id: &str,
    ) -> Result<Option<(DeviceId, Credentials)>, StoreError> {
        let dev: Option<String> = self
            .conn()
            .hget(self.key("i", tenant), index_field(cred_type, auth_id))
            .await
            .map_err(|e| backend("looking up credentials", e))?;
        let Some(dev) = dev else { return Ok(None) };
        let dev = DeviceId::new(dev).map_err(corrupt)?;
        let Some(set) = self.get_credentials(tenant, &dev).await? else {
            return Ok(None);
        };
        Ok(set
            .value
            .into_iter()
            .find(|c| c.cred_type() == cred_type && c.auth_id() == auth_id)
            .map(|c| (dev, c)))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    async fn get_verifier(
        &self,
        tenant: &TenantId,
        auth_id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn()
            .hget(self.key("v", tenant), auth_id)
            .await
            .map_err(|e| backend("reading a password verifier", e))
    }

    async fn put_verifier(
        &self,
        tenant: &TenantId,
        auth_id: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        self.conn()
            .hset::<_, _, _, ()>(self.key("v", tenant), auth_id, value)
            .await
            .map_err(|e| backend("writing a password verifier", e))
    }
}

#[cfg(test)]
mod tests {
    use super::conn::parse_change;
    use super::*;

    #[test]
    fn if_match_normalisation() {
        assert_eq!(want(None), "");
        assert_eq!(want(Some("\"abc\"")), "abc");
        assert_eq!(want(Some("W/\"a\", b")), "a b");
        assert_eq!(want(Some("\"\"")), "\u{1}");
    }

    #[test]
    fn change_messages_parse() {
        assert_eq!(parse_change("T\tt1"), Change::Tenant(TenantId::new("t1").unwrap()));
        assert_eq!(
            parse_change("D\tt1\td1"),
            Change::Device(TenantId::new("t1").unwrap(), DeviceId::new("d1").unwrap())
        );
        assert_eq!(parse_change("garbage"), Change::All);
        let c = Change::Device(TenantId::new("t1").unwrap(), DeviceId::new("d1").unwrap());
        assert_eq!(parse_change(&change_message(&c)), c);
    }
}
