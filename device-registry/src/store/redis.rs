//! Redis store for multi-instance deployments.
//!
//! Layout under a key prefix `P` (default `ferrule:registry`):
//! - `P:tenants`: set of tenant ids; `P:t:{tenant}`: tenant record (JSON `Versioned<Tenant>`);
//! - `P:d:{tenant}`: hash device id -> device record;
//! - `P:c:{tenant}`: hash device id -> credentials record;
//! - `P:i:{tenant}`: hash `{type}\n{auth-id}` -> device id (credentials look-up index);
//! - `P:ca-gen`: counter bumped by every tenant write that adds trusted CAs (see below);
//! - channel `P:changes`: one message per write, so other instances drop cached entries.
//!
//! Every write is one Lua script, so the version check, the existence checks and the
//! write are atomic, as in the embedded store. Versions are compared inside the script
//! against the accepted `If-Match` tags, normalised in Rust.
//!
//! Trusted-CA subject DNs unique across tenants: the DNs come from DER certificates that
//! Lua cannot parse, so the check runs in Rust, optimistically: read `P:ca-gen`, read all
//! tenants and look for a conflict, then write with a script that refuses (`retry`) if
//! `P:ca-gen` moved meanwhile and bumps it otherwise. Two concurrent writes of the same
//! subject into different tenants cannot both succeed. Only writes of tenants that have
//! trusted CAs take part (a write without CAs cannot create a conflict; a delete at worst
//! makes a concurrent check see a conflict that just went away). An instance of a version
//! before this rule does not bump `P:ca-gen`: while such instances share the store, a
//! write through them can race a check here.
//!
//! Size: the Lua scripts that make each write atomic sit next to the Rust that calls them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, ScriptInvocation};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    be, ca_subject_in_use, ca_subjects, corrupt, decode, index_keys, new_record, version_matches,
    Change, RegistryStore, StoreError, CHANGE_CHANNEL_CAPACITY,
};
use crate::model::{CredentialType, Credentials, Device, DeviceId, Tenant, TenantId, Versioned};

/// Shared by every script: does the record `cur` (JSON with a `version`) match `want`
/// (empty: anything; else space-separated accepted versions, `*` = any)? `current` reads
/// the record a script replaces or deletes and checks it.
const VMATCH: &str = r#"
local function vmatch(cur, want)
  if want == '' then return true end
  local v = cjson.decode(cur)['version']
  for tag in string.gmatch(want, '%S+') do
    if tag == '*' or tag == v then return true end
  end
  return false
end
-- The record at KEYS[1] (its hash field `field`, or the key itself if `field` is nil);
-- or nil and the script's result if it is missing or `want` refuses its version.
local function current(field, want)
  local cur
  if field then
    cur = redis.call('HGET', KEYS[1], field)
  else
    cur = redis.call('GET', KEYS[1])
  end
  if not cur then return nil, 'notfound' end
  if not vmatch(cur, want) then return nil, 'mismatch' end
  return cur
end
local function ca_gen(gkey, gen)
  if gen == '' then return true end
  if (redis.call('GET', gkey) or '0') ~= gen then return false end
  redis.call('INCR', gkey)
  return true
end
local function drop_index(ikey, credrec, dev)
  local creds = cjson.decode(credrec)['value']
  for _, c in ipairs(creds) do
    local a = c['auth-id']
    if type(a) ~= 'string' then a = '' end
    local f = c['type'] .. '\n' .. a
    if redis.call('HGET', ikey, f) == dev then redis.call('HDEL', ikey, f) end
  end
end
"#;

// The write scripts; each answers 'ok' ([`Scripts::new`] appends it) unless it returns
// a refusal first ('exists', 'notfound', 'notenant', 'mismatch', 'conflict', 'retry').

// Tenant writes: `gen` is the `P:ca-gen` value the caller's trusted-CA check read ('':
// no check, the tenant has no trusted CAs); `ca_gen` refuses ('retry') if it moved and
// bumps it otherwise, as the last step before writing.

const CREATE_TENANT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if not ca_gen(KEYS[3], ARGV[2]) then return 'retry' end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
"#;

const UPDATE_TENANT: &str = r#"
local _, refused = current(nil, ARGV[1])
if refused then return refused end
if not ca_gen(KEYS[2], ARGV[2]) then return 'retry' end
redis.call('SET', KEYS[1], ARGV[3])
"#;

const DELETE_TENANT: &str = r#"
local _, refused = current(nil, ARGV[1])
if refused then return refused end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[5])
redis.call('SREM', KEYS[2], ARGV[2])
"#;

const CREATE_DEVICE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'notenant' end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 'exists' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
"#;

const UPDATE_DEVICE: &str = r#"
local _, refused = current(ARGV[1], ARGV[2])
if refused then return refused end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
"#;

const DELETE_DEVICE: &str = r#"
local _, refused = current(ARGV[1], ARGV[2])
if refused then return refused end
local creds = redis.call('HGET', KEYS[2], ARGV[1])
if creds then drop_index(KEYS[3], creds, ARGV[1]) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
"#;

const DELETE_DEVICES: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'notfound' end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
"#;

const SET_CREDENTIALS: &str = r#"
local cur, refused = current(ARGV[1], ARGV[2])
if refused then return refused end
for i = 4, #ARGV do
  local owner = redis.call('HGET', KEYS[2], ARGV[i])
  if owner and owner ~= ARGV[1] then return 'conflict' end
end
drop_index(KEYS[2], cur, ARGV[1])
for i = 4, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], ARGV[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
"#;

struct Scripts {
    create_tenant: Script,
    update_tenant: Script,
    delete_tenant: Script,
    create_device: Script,
    update_device: Script,
    delete_device: Script,
    delete_devices: Script,
    set_credentials: Script,
}

impl Scripts {
    fn new() -> Self {
        // A script that does not return a refusal early ends with 'ok'.
        let s = |body: &str| Script::new(&format!("{VMATCH}\n{body}\nreturn 'ok'"));
        Self {
            create_tenant: s(CREATE_TENANT),
            update_tenant: s(UPDATE_TENANT),
            delete_tenant: s(DELETE_TENANT),
            create_device: s(CREATE_DEVICE),
            update_device: s(UPDATE_DEVICE),
            delete_device: s(DELETE_DEVICE),
            delete_devices: s(DELETE_DEVICES),
            set_credentials: s(SET_CREDENTIALS),
        }
    }
}

struct Inner {
    conn: ConnectionManager,
    prefix: String,
    scripts: Scripts,
    changes: broadcast::Sender<Change>,
    /// Stops the pub/sub relay task when the last handle is dropped.
    _stop: DropGuard,
}

/// Redis-backed [`RegistryStore`]; cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("prefix", &self.inner.prefix).finish_non_exhaustive()
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
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/0`) and starts relaying other
    /// instances' changes.
    ///
    /// # Errors
    /// [`StoreError::Backend`] if the URL is invalid or Redis cannot be reached.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(be)?;
        let conn = ConnectionManager::new(client.clone()).await.map_err(be)?;
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL_CAPACITY);
        let stop = CancellationToken::new();
        let channel = format!("{prefix}:changes");
        tokio::spawn(relay_changes(client, channel, changes.clone(), stop.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                prefix: prefix.to_owned(),
                scripts: Scripts::new(),
                changes,
                _stop: stop.drop_guard(),
            }),
        })
    }

    fn key(&self, kind: &str, tenant: &TenantId) -> String {
        format!("{}:{kind}:{tenant}", self.inner.prefix)
    }

    /// The keys of `tenant` for each of `kinds`, in order.
    fn keys(&self, tenant: &TenantId, kinds: &[&str]) -> Vec<String> {
        kinds.iter().map(|kind| self.key(kind, tenant)).collect()
    }

    fn tenants_key(&self) -> String {
        format!("{}:tenants", self.inner.prefix)
    }

    fn ca_gen_key(&self) -> String {
        format!("{}:ca-gen", self.inner.prefix)
    }

    /// Creates or updates tenant `id` with a script from `invocation` (given the
    /// `P:ca-gen` value its check read, to pass before the record), checking that no
    /// other tenant trusts a CA subject of `tenant` (see the module documentation).
    async fn write_tenant<'s>(
        &self,
        id: &TenantId,
        tenant: &Tenant,
        invocation: impl Fn(&str) -> ScriptInvocation<'s>,
    ) -> Result<String, StoreError> {
        /// Tenant writes with CAs racing this one often enough to exhaust this are a
        /// provisioning storm; the client gets 503 and retries.
        const ATTEMPTS: usize = 8;
        let mine = ca_subjects(tenant);
        for _ in 0..ATTEMPTS {
            let gen = if mine.is_empty() {
                String::new()
            } else {
                let gen: Option<String> = self.conn().get(self.ca_gen_key()).await.map_err(be)?;
                for (other, t) in self.list_tenants().await? {
                    if other != *id {
                        ca_subject_in_use(&mine, &t.value)?;
                    }
                }
                gen.unwrap_or_else(|| "0".to_owned())
            };
            let (version, rec) = new_record(tenant)?;
            let mut script = invocation(&gen);
            script.arg(rec);
            let r: String = script.invoke_async(&mut self.conn()).await.map_err(be)?;
            if r == "retry" {
                continue;
            }
            outcome(&r, "tenant")?;
            self.announce(Change::Tenant(id.clone())).await;
            return Ok(version);
        }
        Err(StoreError::Backend("trusted CAs of tenants changed concurrently; retry".into()))
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
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
        let v: Option<Vec<u8>> =
            self.conn().hget(self.key(kind, tenant), device.as_str()).await.map_err(be)?;
        v.map(|b| decode(&b)).transpose()
    }

    /// Runs a write script (keys and arguments added), maps its result (errors name the
    /// tenant or device that `change` names) and announces `change`.
    async fn write(&self, script: &ScriptInvocation<'_>, change: Change) -> Result<(), StoreError> {
        let r: String = script.invoke_async(&mut self.conn()).await.map_err(be)?;
        let what = match change {
            Change::Tenant(_) => "tenant",
            Change::Device(..) => "device",
            Change::All => "registry",
        };
        outcome(&r, what)?;
        self.announce(change).await;
        Ok(())
    }

    /// Tells this instance's subscribers at once and other instances via pub/sub.
    async fn announce(&self, c: Change) {
        let _ = self.inner.changes.send(c.clone());
        let payload = match &c {
            Change::Tenant(t) => format!("T\t{t}"),
            Change::Device(t, d) => format!("D\t{t}\t{d}"),
            Change::All => "*".to_owned(),
        };
        let channel = format!("{}:changes", self.inner.prefix);
        if let Err(e) = self.conn().publish::<_, _, ()>(channel, payload).await {
            // The write is done; other instances fall back to their cache TTL.
            tracing::warn!(error = %e, "could not publish registry change");
        }
    }
}

fn parse_change(payload: &str) -> Change {
    let mut parts = payload.split('\t');
    let tag = parts.next();
    let t = parts.next().and_then(|t| TenantId::new(t).ok());
    let d = parts.next().and_then(|d| DeviceId::new(d).ok());
    match (tag, t, d) {
        (Some("T"), Some(t), _) => Change::Tenant(t),
        (Some("D"), Some(t), Some(d)) => Change::Device(t, d),
        // Anything unexpected: be safe and drop everything.
        _ => Change::All,
    }
}

/// Relays pub/sub messages into the local broadcast until `stop`. After any (re)subscribe
/// it emits [`Change::All`]: messages sent while disconnected are lost.
async fn relay_changes(
    client: redis::Client,
    channel: String,
    tx: broadcast::Sender<Change>,
    stop: CancellationToken,
) {
    loop {
        let session = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            let _ = tx.send(Change::All);
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                let payload: String = msg.get_payload().unwrap_or_default();
                let _ = tx.send(parse_change(&payload));
            }
            Ok::<(), redis::RedisError>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = session => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "registry change subscription failed; retrying");
                }
            }
        }
        let _ = tx.send(Change::All);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[async_trait]
impl RegistryStore for RedisStore {
    async fn create_tenant(&self, id: &TenantId, tenant: &Tenant) -> Result<String, StoreError> {
        self.write_tenant(id, tenant, |gen| {
            let mut script = self.inner.scripts.create_tenant.key(self.key("t", id));
            script.key(self.tenants_key()).key(self.ca_gen_key()).arg(id.as_str()).arg(gen);
            script
        })
        .await
    }

    async fn get_tenant(&self, id: &TenantId) -> Result<Option<Versioned<Tenant>>, StoreError> {
        let v: Option<Vec<u8>> = self.conn().get(self.key("t", id)).await.map_err(be)?;
        v.map(|b| decode(&b)).transpose()
    }

    async fn update_tenant(
        &self,
        id: &TenantId,
        tenant: &Tenant,
        if_match: Option<&str>,
    ) -> Result<String, StoreError> {
        if !ca_subjects(tenant).is_empty() {
            // As the embedded store answers: 404 and 412 before a CA conflict (the
            // script checks both again, atomically).
            let cur = self.get_tenant(id).await?.ok_or(StoreError::NotFound("tenant"))?;
            if !version_matches(if_match, &cur.version) {
                return Err(StoreError::VersionMismatch);
            }
        }
        self.write_tenant(id, tenant, |gen| {
            let mut script = self.inner.scripts.update_tenant.key(self.key("t", id));
            script.key(self.ca_gen_key()).arg(want(if_match)).arg(gen);
            script
        })
        .await
    }

    async fn delete_tenant(&self, id: &TenantId, if_match: Option<&str>) -> Result<(), StoreError> {
        let mut script = self.inner.scripts.delete_tenant.key(self.key("t", id));
        script.key(self.tenants_key()).key(self.keys(id, &["d", "c", "i"]));
        script.arg(want(if_match)).arg(id.as_str());
        self.write(&script, Change::Tenant(id.clone())).await
    }

    async fn list_tenants(&self) -> Result<Vec<(TenantId, Versioned<Tenant>)>, StoreError> {
        let mut ids: Vec<String> = self.conn().smembers(self.tenants_key()).await.map_err(be)?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(ids.len());
        // MGET in bounded batches so one call never builds a huge reply.
        for chunk in ids.chunks(500) {
            let tids: Vec<TenantId> = chunk
                .iter()
                .map(|i| TenantId::new(i.as_str()).map_err(corrupt))
                .collect::<Result<_, _>>()?;
            let keys: Vec<String> = tids.iter().map(|t| self.key("t", t)).collect();
            let vals: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut self.conn()).await.map_err(be)?;
            for (t, v) in tids.into_iter().zip(vals) {
                // A tenant deleted between SMEMBERS and MGET is simply skipped.
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
        let mut script = self.inner.scripts.delete_device.key(self.keys(tenant, &["d", "c", "i"]));
        script.arg(id.as_str()).arg(want(if_match));
        self.write(&script, Change::Device(tenant.clone(), id.clone())).await
    }

    async fn list_devices(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<(DeviceId, Versioned<Device>)>, StoreError> {
        let all: Vec<(String, Vec<u8>)> =
            self.conn().hgetall(self.key("d", tenant)).await.map_err(be)?;
        let mut out = all
            .into_iter()
            .map(|(k, v)| Ok((DeviceId::new(k).map_err(corrupt)?, decode(&v)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn delete_devices_of_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let keys = self.keys(tenant, &["t", "d", "c", "i"]);
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
        let mut script = self.inner.scripts.set_credentials.key(self.keys(tenant, &["c", "i"]));
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
            .map_err(be)?;
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
}

#[cfg(test)]
mod tests {
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
    }
}
