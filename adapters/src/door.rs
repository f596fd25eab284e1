//! The device front door: the rules every adapter applies to a device's request, written
//! once. An adapter decodes its protocol into credentials and the tenant/device a request
//! names; the door says whom the request acts for ([`Target::resolve`], pure) and whether
//! it may ([`authorize`], registry checks); the adapter maps the door's answers to its
//! protocol's codes in one table of its own.
//!
//! The rules (Hono's):
//! - A username or PSK identity is `auth-id@tenant`; the tenant is after the last `@`
//!   ([`split_auth_id`]).
//! - An authenticated device names no device (or itself): it acts for itself. Naming
//!   another device of its tenant makes it a gateway acting for that device, which must
//!   list the gateway in `via`. Naming another tenant is refused. An empty tenant means
//!   the device's own tenant.
//! - An unauthenticated request must name tenant and device; the tenant must allow
//!   unauthenticated devices on the adapter, and the device must exist and be enabled.
//! - A tenant with an `adapters` list may use only the adapters it enables there: its
//!   devices are refused (as for a disabled tenant) on the others.
//! - A principal authenticated once for a long-lived session (an MQTT connection, a DTLS
//!   session) is checked again on every request, so that disabling a device, a gateway or
//!   a tenant cuts it off at its next publish. A principal authenticated per request
//!   (HTTP) was checked by its authentication.
//!
//! Size: the door's rules and the connection table they feed (about 525 lines of code;
//! tests at the end).

use std::sync::Arc;

use crate::device::{AdapterAccess, AuthError, CredentialKind, DeviceIdentity, DeviceRegistry};
use crate::quota::{now_secs, TenantLimits, UsageLimit, Used};

/// Splits `auth-id@tenant` (Hono's username and PSK identity form); the tenant is after
/// the last `@`. Both parts must be non-empty.
pub fn split_auth_id(username: &str) -> Option<(&str, &str)> {
    let (auth_id, tenant) = username.rsplit_once('@')?;
    (!auth_id.is_empty() && !tenant.is_empty()).then_some((auth_id, tenant))
}

/// [`split_auth_id`] for identities that arrive as bytes (DTLS PSK identities): UTF-8 only.
pub fn split_auth_id_bytes(identity: &[u8]) -> Option<(&str, &str)> {
    split_auth_id(std::str::from_utf8(identity).ok()?)
}

/// Whom a request is for, once the names in it have been checked against the principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The authenticated device itself.
    Own { tenant: String, device: String },
    /// A device the authenticated gateway acts for (`via` still to be checked).
    ViaGateway { tenant: String, device: String, gateway: String },
    /// An unauthenticated device (the tenant's permission still to be checked).
    Unauthenticated { tenant: String, device: String },
}

/// Why the names in a request cannot be used by its principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// The request names a tenant other than the authenticated one.
    TenantMismatch,
    /// An unauthenticated request did not name tenant and device.
    IdentityRequired,
}

impl Target {
    /// Decides whom a request naming `tenant` and `device` (either may be absent; an
    /// empty tenant counts as absent) is for, given who sent it (`None`: unauthenticated).
    pub fn resolve(
        principal: Option<&DeviceIdentity>,
        tenant: Option<&str>,
        device: Option<&str>,
    ) -> Result<Target, TargetError> {
        let tenant = tenant.filter(|t| !t.is_empty());
        match (principal, device) {
            (Some(id), None) => {
                if tenant.is_some_and(|t| t != id.tenant) {
                    return Err(TargetError::TenantMismatch);
                }
                Ok(Target::Own { tenant: id.tenant.clone(), device: id.device_id.clone() })
            }
            (Some(id), Some(device)) => {
                if tenant.is_some_and(|t| t != id.tenant) {
                    return Err(TargetError::TenantMismatch);
                }
                if device == id.device_id {
                    Ok(Target::Own { tenant: id.tenant.clone(), device: device.to_owned() })
                } else {
                    Ok(Target::ViaGateway {
                        tenant: id.tenant.clone(),
                        device: device.to_owned(),
                        gateway: id.device_id.clone(),
                    })
                }
            }
            (None, Some(device)) if !device.is_empty() => match tenant {
                Some(tenant) => Ok(Target::Unauthenticated {
                    tenant: tenant.to_owned(),
                    device: device.to_owned(),
                }),
                None => Err(TargetError::IdentityRequired),
            },
            (None, _) => Err(TargetError::IdentityRequired),
        }
    }

    pub fn tenant(&self) -> &str {
        match self {
            Target::Own { tenant, .. }
            | Target::ViaGateway { tenant, .. }
            | Target::Unauthenticated { tenant, .. } => tenant,
        }
    }

    pub fn device(&self) -> &str {
        match self {
            Target::Own { device, .. }
            | Target::ViaGateway { device, .. }
            | Target::Unauthenticated { device, .. } => device,
        }
    }

    /// The tenant and device, owned.
    pub fn into_tenant_device(self) -> (String, String) {
        match self {
            Target::Own { tenant, device }
            | Target::ViaGateway { tenant, device, .. }
            | Target::Unauthenticated { tenant, device } => (tenant, device),
        }
    }

    /// Whether a gateway acts for the device.
    pub fn via_gateway(&self) -> bool {
        matches!(self, Target::ViaGateway { .. })
    }
}

/// How long the principal's authentication stands, which decides what [`authorize`]
/// checks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Authenticated with this very request (HTTP): its authentication checked it.
    ThisRequest,
    /// Authenticated once for a session (MQTT connection, DTLS session): checked again.
    Session,
}

/// Why [`authorize`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The registry refused: unknown or disabled device or tenant, gateway not in `via`,
    /// busy, unavailable.
    Auth(AuthError),
    /// The tenant does not allow unauthenticated devices on this adapter.
    UnauthenticatedNotAllowed,
}

/// A refusal, and whether it is about the session's own principal (the connected device or
/// gateway, or its tenant, is disabled or gone: the session should end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub denied: Denied,
    pub principal_gone: bool,
}

impl Refused {
    fn about_target(e: AuthError) -> Self {
        Self { denied: Denied::Auth(e), principal_gone: false }
    }

    fn about_principal(e: AuthError) -> Self {
        let gone = matches!(
            e,
            AuthError::DeviceDisabled
                | AuthError::UnknownDevice
                | AuthError::TenantDisabled
                | AuthError::UnknownTenant
        );
        Self { denied: Denied::Auth(e), principal_gone: gone }
    }
}

/// The registry checks for a request for `target` on `adapter` (the registry caches, so
/// each is a map look-up when warm); the tenant's terms for the adapter, when it may.
pub async fn authorize(
    registry: &dyn DeviceRegistry,
    adapter: &str,
    target: &Target,
    standing: Standing,
) -> Result<AdapterAccess, Refused> {
    match target {
        Target::Own { tenant, device } => {
            if standing == Standing::Session {
                registry
                    .authorize_device(tenant, device, None)
                    .await
                    .map_err(Refused::about_principal)?;
            }
        }
        Target::ViaGateway { tenant, device, gateway } => {
            registry
                .authorize_device(tenant, device, Some(gateway))
                .await
                .map_err(Refused::about_target)?;
            if standing == Standing::Session {
                registry
                    .authorize_device(tenant, gateway, None)
                    .await
                    .map_err(Refused::about_principal)?;
            }
        }
        Target::Unauthenticated { tenant, device } => {
            // The tenant's permission names the adapter: nothing more to check for it.
            let access =
                registry.adapter_access(tenant, adapter).await.map_err(Refused::about_target)?;
            if !access.unauthenticated {
                return Err(Refused {
                    denied: Denied::UnauthenticatedNotAllowed,
                    principal_gone: false,
                });
            }
            registry.authorize_device(tenant, device, None).await.map_err(Refused::about_target)?;
            return Ok(access);
        }
    }
    // The tenant may have switched this adapter off (its `adapters` list).
    let access =
        registry.adapter_access(target.tenant(), adapter).await.map_err(Refused::about_target)?;
    if !access.enabled {
        return Err(Refused::about_principal(AuthError::TenantDisabled));
    }
    Ok(access)
}

/// How long a connection reuses a registry decision it memoised ([`Memo`]) while the
/// registry processed no change. Bounds how much later than the registry's own caches a
/// connection can notice a change whose notification never came (Redis pub/sub is
/// at-most-once); every notified change ends the memo at once.
pub const MEMO_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Remembered values, each valid while the registry's change sequence
/// ([`DeviceRegistry::change_seq`]) is what it was when the value was made, and for at most
/// [`MEMO_TTL`]: the shared mechanism of [`Memo`] and the HTTP adapter's remembered
/// identity. It holds at most as many values as a `put` makes room for, and nothing
/// (no allocation) until the first.
#[derive(Debug)]
pub struct Remembered<T>(std::sync::Mutex<Kept<T>>);

#[derive(Debug)]
struct Kept<T> {
    /// The change sequence every kept value was made at.
    seq: u64,
    values: Vec<(std::time::Instant, T)>,
}

impl<T> Default for Remembered<T> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Kept { seq: 0, values: Vec::new() }))
    }
}

impl<T: Clone> Remembered<T> {
    /// A value that `fits`, if one is still current at `seq`.
    pub fn get(&self, seq: u64, fits: impl Fn(&T) -> bool) -> Option<T> {
        let kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.seq != seq {
            return None;
        }
        let (_, value) =
            kept.values.iter().find(|(at, value)| fits(value) && at.elapsed() < MEMO_TTL)?;
        Some(value.clone())
    }

    /// Remembers `value`, made when the change sequence was `seq`, in place of the kept
    /// value it `replaces` if any, else beside the others while fewer than `room` are kept,
    /// else in place of the oldest. Values made at another sequence are dropped.
    pub fn put(&self, seq: u64, value: T, room: usize, replaces: impl Fn(&T) -> bool) {
        let now = std::time::Instant::now();
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.seq != seq {
            kept.seq = seq;
            kept.values.clear();
        }
        let values = &mut kept.values;
        let slot = match values.iter().position(|(_, v)| replaces(v)) {
            Some(i) => i,
            None if values.len() < room.max(1) => {
                // Grown one at a time: most connections only ever keep one value.
                values.reserve_exact(1);
                values.push((now, value));
                return;
            }
            None => (0..values.len()).min_by_key(|&i| values[i].0).unwrap_or(0),
        };
        values[slot] = (now, value);
    }
}

/// How many targets a connection's [`Memo`] keeps decisions for: a gateway publishing for
/// its devices in turn is answered from the memo for up to this many of them (a device
/// that acts only for itself has one target). Bounds the memo to a few KiB.
pub const MEMO_TARGETS: usize = 16;

/// A connection's last positive registry decisions, per target, so that a device (or a
/// gateway, for up to [`MEMO_TARGETS`] of its devices) publishing again and again is not
/// checked again and again ([`Remembered`]: reused while the registry processed no change,
/// for at most [`MEMO_TTL`]). Refusals are never memoised. One per connection (a
/// connection authenticates one principal, so its decisions differ only by target).
#[derive(Debug, Default)]
pub struct Memo(Remembered<(Target, Standing, AdapterAccess)>);

/// [`authorize`] through a connection's [`Memo`]: the same answer, without the registry
/// checks when the memo holds a positive one for `target` that is still current.
pub async fn authorize_memo(
    registry: &dyn DeviceRegistry,
    adapter: &str,
    target: &Target,
    standing: Standing,
    memo: &Memo,
) -> Result<AdapterAccess, Refused> {
    // Read before the checks: a change processed while they run makes the memo stale.
    let Some(seq) = registry.change_seq() else {
        return authorize(registry, adapter, target, standing).await;
    };
    if let Some((.., access)) = memo.0.get(seq, |(t, s, _)| t == target && *s == standing) {
        return Ok(access);
    }
    let access = authorize(registry, adapter, target, standing).await?;
    let same = |(t, s, _): &(Target, Standing, AdapterAccess)| t == target && *s == standing;
    memo.0.put(seq, (target.clone(), standing, access.clone()), MEMO_TARGETS, same);
    Ok(access)
}

/// Why [`admit`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inadmissible {
    /// The names in the request (see [`TargetError`]).
    Target(TargetError),
    /// The registry's checks (see [`authorize`]).
    Refused(Refused),
}

impl Inadmissible {
    /// The refusal as a registry answer, for adapters that do not tell them apart:
    /// `None` when the request lacks an identity (no credentials, no names, or an
    /// unauthenticated device its tenant does not allow).
    pub fn auth_error(&self) -> Option<AuthError> {
        match self {
            Inadmissible::Target(TargetError::TenantMismatch) => Some(AuthError::TenantMismatch),
            Inadmissible::Target(TargetError::IdentityRequired) => None,
            Inadmissible::Refused(Refused { denied: Denied::Auth(e), .. }) => Some(e.clone()),
            Inadmissible::Refused(Refused {
                denied: Denied::UnauthenticatedNotAllowed, ..
            }) => None,
        }
    }
}

/// [`Target::resolve`] then [`authorize`]: whom a request naming `tenant` and `device`
/// from `principal` acts for, once the registry agreed, and its tenant's terms.
pub async fn admit(
    registry: &dyn DeviceRegistry,
    adapter: &str,
    principal: Option<&DeviceIdentity>,
    (tenant, device): (Option<&str>, Option<&str>),
    standing: Standing,
) -> Result<(Target, AdapterAccess), Inadmissible> {
    admit_memo(registry, adapter, principal, (tenant, device), standing, None).await
}

/// [`admit`], through a connection's [`Memo`] when there is one.
pub async fn admit_memo(
    registry: &dyn DeviceRegistry,
    adapter: &str,
    principal: Option<&DeviceIdentity>,
    (tenant, device): (Option<&str>, Option<&str>),
    standing: Standing,
    memo: Option<&Memo>,
) -> Result<(Target, AdapterAccess), Inadmissible> {
    let target = Target::resolve(principal, tenant, device).map_err(Inadmissible::Target)?;
    let access = match memo {
        Some(memo) => authorize_memo(registry, adapter, &target, standing, memo).await,
        None => authorize(registry, adapter, &target, standing).await,
    }
    .map_err(Inadmissible::Refused)?;
    Ok((target, access))
}

/// Open device connections of a connection-oriented adapter, per tenant and device: for
/// the tenant's `max-connections` resource limit (Hono counts MQTT and AMQP connections;
/// here in process, exact for this instance, no metrics round trip), and to close a
/// device's connections when the registry no longer lets it in ([`Connections::revalidate`]).
#[derive(Debug, Default)]
pub struct Connections {
    tenants: std::sync::Mutex<std::collections::HashMap<String, TenantEntry>>,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct TenantEntry {
    count: u32,
    /// device → its open connections.
    devices: std::collections::HashMap<String, Vec<Open>>,
    /// Seconds its closed connections lasted in the current connection-duration period
    /// (kept only for tenants with that limit).
    closed: Used,
}

#[derive(Debug)]
struct Open {
    id: u64,
    /// When it opened (seconds since the epoch).
    since: i64,
    /// The credential it authenticated with (`None`: none to check, e.g. a PSK session).
    credential: Option<(DeviceIdentity, CredentialKind)>,
    /// What closes it.
    revoked: tokio_util::sync::CancellationToken,
}

impl TenantEntry {
    /// Seconds its connections lasted in the period starting at `period`, up to `now`.
    fn connected_secs(&self, period: i64, now: i64) -> u64 {
        let open: i64 =
            self.devices.values().flatten().map(|open| (now - open.since.max(period)).max(0)).sum();
        self.closed.in_period(period).saturating_add(open as u64)
    }
}

/// One counted connection; dropping it gives the place back.
#[derive(Debug)]
pub struct ConnectionSlot {
    owner: Arc<Connections>,
    tenant: String,
    device: String,
    id: u64,
    /// The tenant's connection-duration limit when it opened (its time is counted at close).
    duration: Option<UsageLimit>,
    revoked: tokio_util::sync::CancellationToken,
}

/// Which devices a registry change may have affected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Tenant(String),
    Device(String, String),
    All,
}

impl Connections {
    /// A slot for one more connection of `device` of `tenant`, or the name of the tenant
    /// limit that refuses it: `max_connections` (it holds as many as it may) or
    /// `connection_duration` (its devices were connected as long as the period allows).
    pub fn open(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        limits: &TenantLimits,
    ) -> Result<ConnectionSlot, &'static str> {
        self.open_with(tenant, device, limits, None)
    }

    /// [`Connections::open`] for a connection authenticated by `credential`: it is closed
    /// when that credential is disabled or removed ([`Connections::revalidate`]).
    pub fn open_with(
        self: &Arc<Self>,
        tenant: &str,
        device: &str,
        limits: &TenantLimits,
        credential: Option<(DeviceIdentity, CredentialKind)>,
    ) -> Result<ConnectionSlot, &'static str> {
        let now = now_secs();
        let mut tenants = self.tenants.lock().expect("poisoned");
        let entry = tenants.entry(tenant.to_owned()).or_default();
        let refusal = if limits.max_connections.is_some_and(|max| entry.count >= max) {
            Some("max_connections")
        } else if limits.connection_duration.is_some_and(|limit| {
            limit.period_start(now).is_some_and(|p| entry.connected_secs(p, now) >= limit.max)
        }) {
            Some("connection_duration")
        } else {
            None
        };
        if let Some(limit) = refusal {
            if entry.count == 0 && entry.closed.amount == 0 {
                tenants.remove(tenant);
            }
            return Err(limit);
        }
        entry.count += 1;
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let revoked = tokio_util::sync::CancellationToken::new();
        let open = Open { id, since: now, credential, revoked: revoked.clone() };
        entry.devices.entry(device.to_owned()).or_default().push(open);
        Ok(ConnectionSlot {
            owner: self.clone(),
            tenant: tenant.to_owned(),
            device: device.to_owned(),
            id,
            duration: limits.connection_duration,
            revoked,
        })
    }

    /// Connections `tenant` holds open now.
    pub fn count(&self, tenant: &str) -> u32 {
        self.tenants.lock().expect("poisoned").get(tenant).map_or(0, |t| t.count)
    }

    /// Asks the registry again about every device with open connections in `scope`, and
    /// closes the connections of those it no longer lets use `adapter` (device or tenant
    /// disabled or deleted, adapter switched off), and those whose credential was disabled
    /// or removed. A registry that cannot answer closes nothing. Returns how many
    /// connections were told to close.
    pub async fn revalidate(
        &self,
        registry: &dyn DeviceRegistry,
        adapter: &str,
        scope: &Scope,
    ) -> usize {
        let devices: Vec<(String, String)> = {
            let tenants = self.tenants.lock().expect("poisoned");
            tenants
                .iter()
                .filter(|(tenant, _)| match scope {
                    Scope::All => true,
                    Scope::Tenant(t) | Scope::Device(t, _) => *tenant == t,
                })
                .flat_map(|(tenant, entry)| {
                    entry.devices.keys().map(move |device| (tenant.clone(), device.clone()))
                })
                .filter(|(_, device)| match scope {
                    Scope::Device(_, d) => device == d,
                    _ => true,
                })
                .collect()
        };
        let mut closed = 0;
        for (tenant, device) in devices {
            let allowed = match registry.authorize_device(&tenant, &device, None).await {
                Ok(()) => match registry.adapter_access(&tenant, adapter).await {
                    Ok(access) => access.enabled,
                    Err(e) => !refuses(&e),
                },
                Err(e) => !refuses(&e),
            };
            if !allowed {
                closed += self.close(&tenant, &device);
                continue;
            }
            for (id, identity, kind) in self.credentials_of(&tenant, &device) {
                // A registry that cannot tell (`Err`) keeps the connection.
                if let Ok(false) = registry.credential_usable(&identity, kind).await {
                    closed += self.close_one(&tenant, &device, id);
                }
            }
        }
        closed
    }

    /// The open connections of `device` that authenticated with a credential.
    fn credentials_of(
        &self,
        tenant: &str,
        device: &str,
    ) -> Vec<(u64, DeviceIdentity, CredentialKind)> {
        let tenants = self.tenants.lock().expect("poisoned");
        let Some(list) = tenants.get(tenant).and_then(|t| t.devices.get(device)) else {
            return Vec::new();
        };
        list.iter()
            .filter_map(|open| {
                let (identity, kind) = open.credential.clone()?;
                Some((open.id, identity, kind))
            })
            .collect()
    }

    /// Tells connection `id` of `device` to close.
    fn close_one(&self, tenant: &str, device: &str, id: u64) -> usize {
        let tenants = self.tenants.lock().expect("poisoned");
        let open = tenants
            .get(tenant)
            .and_then(|t| t.devices.get(device))
            .and_then(|list| list.iter().find(|open| open.id == id));
        open.map_or(0, |open| {
            open.revoked.cancel();
            1
        })
    }

    /// Tells every connection of `device` of `tenant` to close.
    fn close(&self, tenant: &str, device: &str) -> usize {
        let tenants = self.tenants.lock().expect("poisoned");
        let Some(connections) = tenants.get(tenant).and_then(|t| t.devices.get(device)) else {
            return 0;
        };
        for open in connections {
            open.revoked.cancel();
        }
        connections.len()
    }
}

/// Whether the registry's answer means "no" (rather than "cannot tell now").
fn refuses(e: &AuthError) -> bool {
    !matches!(e, AuthError::Busy | AuthError::Unavailable(_))
}

impl ConnectionSlot {
    /// Cancelled when the registry no longer lets the device in: close the connection.
    pub fn revoked(&self) -> tokio_util::sync::CancellationToken {
        self.revoked.clone()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut tenants = self.owner.tenants.lock().expect("poisoned");
        let Some(entry) = tenants.get_mut(&self.tenant) else { return };
        entry.count -= 1;
        let mut since = None;
        if let Some(list) = entry.devices.get_mut(&self.device) {
            if let Some(at) = list.iter().position(|open| open.id == self.id) {
                since = Some(list.swap_remove(at).since);
            }
            if list.is_empty() {
                entry.devices.remove(&self.device);
            }
        }
        let now = now_secs();
        let period = self.duration.and_then(|limit| limit.period_start(now));
        if let (Some(period), Some(since)) = (period, since) {
            entry.closed.add(period, (now - since.max(period)).max(0) as u64);
        }
        if entry.count == 0 && entry.closed.amount == 0 {
            tenants.remove(&self.tenant);
        }
    }
}

/// Counts a refusal over one of a tenant's limits (`ferrule_tenant_limit_refusals_total`).
pub fn limit_refused(tenant: &str, adapter: &'static str, limit: &'static str) {
    metrics::counter!("ferrule_tenant_limit_refusals_total", "tenant" => tenant.to_owned(), "adapter" => adapter, "limit" => limit).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> DeviceIdentity {
        DeviceIdentity { tenant: "t1".into(), device_id: "gw".into(), auth_id: "gw".into() }
    }

    #[test]
    fn auth_ids() {
        assert_eq!(split_auth_id("sensor1@DEFAULT_TENANT"), Some(("sensor1", "DEFAULT_TENANT")));
        assert_eq!(split_auth_id("a@b@t1"), Some(("a@b", "t1")));
        assert_eq!(split_auth_id("sensor1"), None);
        assert_eq!(split_auth_id("@t1"), None);
        assert_eq!(split_auth_id("s@"), None);
        assert_eq!(split_auth_id_bytes(b"a@b@t1"), Some(("a@b", "t1")));
        assert_eq!(split_auth_id_bytes(&[0xff, b'@', b't']), None);
    }

    #[test]
    fn targets() {
        let gw = gateway();
        let own = Target::Own { tenant: "t1".into(), device: "gw".into() };
        assert_eq!(Target::resolve(Some(&gw), None, None), Ok(own.clone()));
        assert_eq!(Target::resolve(Some(&gw), Some("t1"), Some("gw")), Ok(own.clone()));
        assert_eq!(Target::resolve(Some(&gw), Some(""), Some("gw")), Ok(own.clone()));
        assert_eq!(Target::resolve(Some(&gw), Some("t1"), None), Ok(own));
        assert_eq!(
            Target::resolve(Some(&gw), Some(""), Some("d1")),
            Ok(Target::ViaGateway {
                tenant: "t1".into(),
                device: "d1".into(),
                gateway: "gw".into()
            })
        );
        assert_eq!(
            Target::resolve(Some(&gw), Some("t2"), Some("d1")),
            Err(TargetError::TenantMismatch)
        );
        assert_eq!(Target::resolve(Some(&gw), Some("t2"), None), Err(TargetError::TenantMismatch));
        assert_eq!(
            Target::resolve(None, Some("t2"), Some("d2")),
            Ok(Target::Unauthenticated { tenant: "t2".into(), device: "d2".into() })
        );
        assert_eq!(Target::resolve(None, Some(""), Some("d2")), Err(TargetError::IdentityRequired));
        assert_eq!(Target::resolve(None, None, Some("d2")), Err(TargetError::IdentityRequired));
        assert_eq!(Target::resolve(None, Some("t2"), None), Err(TargetError::IdentityRequired));
    }

    /// A registry whose devices are enabled unless listed in `disabled`; counts its checks.
    #[derive(Default)]
    struct Counting {
        seq: std::sync::atomic::AtomicU64,
        checks: std::sync::atomic::AtomicUsize,
        disabled: std::sync::Mutex<Vec<String>>,
        no_seq: bool,
    }

    impl Counting {
        fn change(&self, disable: Option<&str>) {
            if let Some(d) = disable {
                self.disabled.lock().unwrap().push(d.into());
            }
            self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }

        fn checks(&self) -> usize {
            self.checks.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl DeviceRegistry for Counting {
        fn authenticate_password<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: &'a [u8],
            _: Option<std::net::IpAddr>,
        ) -> crate::BoxFuture<'a, Result<DeviceIdentity, AuthError>> {
            Box::pin(async { Err(AuthError::BadCredentials) })
        }

        fn authorize_device<'a>(
            &'a self,
            _: &'a str,
            device_id: &'a str,
            _: Option<&'a str>,
        ) -> crate::BoxFuture<'a, Result<(), AuthError>> {
            self.checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let disabled = self.disabled.lock().unwrap().iter().any(|d| d == device_id);
            Box::pin(async move {
                if disabled {
                    Err(AuthError::DeviceDisabled)
                } else {
                    Ok(())
                }
            })
        }

        fn adapter_access<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> crate::BoxFuture<'a, Result<AdapterAccess, AuthError>> {
            Box::pin(async { Ok(AdapterAccess { enabled: true, ..Default::default() }) })
        }

        fn psk<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
        ) -> crate::BoxFuture<'a, Result<(DeviceIdentity, Vec<u8>), AuthError>> {
            Box::pin(async { Err(AuthError::BadCredentials) })
        }

        fn change_seq(&self) -> Option<u64> {
            (!self.no_seq).then(|| self.seq.load(std::sync::atomic::Ordering::SeqCst))
        }
    }

    #[tokio::test]
    async fn the_memo_answers_until_the_registry_changes() {
        let registry = Counting::default();
        let memo = Memo::default();
        let own = Target::Own { tenant: "t1".into(), device: "d1".into() };
        let other = Target::Own { tenant: "t1".into(), device: "d2".into() };
        let check = |t: &Target, standing| {
            let t = t.clone();
            let (registry, memo) = (&registry, &memo);
            async move { authorize_memo(registry, "mqtt", &t, standing, memo).await }
        };
        assert!(check(&own, Standing::Session).await.is_ok());
        assert_eq!(registry.checks(), 1);
        assert!(check(&own, Standing::Session).await.unwrap().enabled);
        assert_eq!(registry.checks(), 1, "the second publish is answered by the memo");
        // Another target, or another standing, is checked, and kept beside the first.
        assert!(check(&other, Standing::Session).await.is_ok());
        assert_eq!(registry.checks(), 2);
        assert!(check(&own, Standing::Session).await.is_ok());
        assert!(check(&other, Standing::Session).await.is_ok());
        assert_eq!(registry.checks(), 2, "both targets are answered by the memo");
        // A change anywhere in the registry ends the memo: a disabled device is refused
        // at once, and refusals are not memoised; the other target is checked afresh.
        registry.change(Some("d1"));
        let refused = check(&own, Standing::Session).await.unwrap_err();
        assert_eq!(refused.denied, Denied::Auth(AuthError::DeviceDisabled));
        assert!(refused.principal_gone);
        check(&own, Standing::Session).await.unwrap_err();
        assert!(check(&other, Standing::Session).await.is_ok());
        assert_eq!(registry.checks(), 5);
    }

    #[tokio::test]
    async fn a_gateway_memo_keeps_its_devices_up_to_a_bound() {
        let registry = Counting::default();
        let memo = Memo::default();
        let device = |i: usize| Target::ViaGateway {
            tenant: "t1".into(),
            device: format!("d{i}"),
            gateway: "gw".into(),
        };
        let round = |n: usize| {
            let (registry, memo) = (&registry, &memo);
            async move {
                for i in 0..n {
                    authorize_memo(registry, "mqtt", &device(i), Standing::Session, memo)
                        .await
                        .unwrap();
                }
            }
        };
        // MEMO_TARGETS devices in turn: each is checked once (the device for the gateway,
        // and the gateway itself), then answered by the memo.
        round(MEMO_TARGETS).await;
        round(MEMO_TARGETS).await;
        assert_eq!(registry.checks(), 2 * MEMO_TARGETS);
        assert_eq!(memo.0 .0.lock().unwrap().values.len(), MEMO_TARGETS);
        // One more device takes the oldest one's place; the memo never grows past the bound.
        round(MEMO_TARGETS + 1).await;
        assert_eq!(memo.0 .0.lock().unwrap().values.len(), MEMO_TARGETS);
        assert!(registry.checks() > 2 * MEMO_TARGETS, "the extra device was checked");
        // A disabled device is refused at once, whatever the memo kept for it.
        registry.change(Some("d3"));
        let refused = authorize_memo(&registry, "mqtt", &device(3), Standing::Session, &memo).await;
        assert_eq!(refused.unwrap_err().denied, Denied::Auth(AuthError::DeviceDisabled));
    }

    #[tokio::test]
    async fn the_memo_expires_and_needs_a_change_sequence() {
        let registry = Counting::default();
        let memo = Memo::default();
        let own = Target::Own { tenant: "t1".into(), device: "d1".into() };
        authorize_memo(&registry, "mqtt", &own, Standing::Session, &memo).await.unwrap();
        std::thread::sleep(MEMO_TTL);
        authorize_memo(&registry, "mqtt", &own, Standing::Session, &memo).await.unwrap();
        assert_eq!(registry.checks(), 2, "a memo older than MEMO_TTL is not used");

        let registry = Counting { no_seq: true, ..Default::default() };
        for _ in 0..3 {
            authorize_memo(&registry, "mqtt", &own, Standing::Session, &memo).await.unwrap();
        }
        assert_eq!(registry.checks(), 3, "without a change sequence every request is checked");
    }

    fn max(n: u32) -> TenantLimits {
        TenantLimits { max_connections: Some(n), ..Default::default() }
    }

    #[test]
    fn tenant_connections_are_counted_and_given_back() {
        let counts = Arc::new(Connections::default());
        let a1 = counts.open("a", "d1", &max(2)).expect("first");
        let a2 = counts.open("a", "d2", &max(2)).expect("second");
        assert_eq!(counts.open("a", "d3", &max(2)).err(), Some("max_connections"));
        let b = counts.open("b", "d1", &max(1)).expect("another tenant has its own count");
        assert_eq!((counts.count("a"), counts.count("b")), (2, 1));
        drop(a1);
        let a3 = counts.open("a", "d1", &max(2)).expect("a place was given back");
        let a4 = counts.open("a", "d1", &TenantLimits::default()).expect("no limit");
        assert_eq!(counts.close("a", "d1"), 2, "both connections of d1");
        assert!(a3.revoked().is_cancelled() && a4.revoked().is_cancelled());
        assert!(!a2.revoked().is_cancelled() && !b.revoked().is_cancelled());
        drop((a2, a3, a4, b));
        assert_eq!((counts.count("a"), counts.count("b")), (0, 0));
        assert!(counts.tenants.lock().unwrap().is_empty(), "no entry left for idle tenants");
    }

    #[test]
    fn connection_time_is_counted_per_period() {
        let counts = Arc::new(Connections::default());
        let limit = UsageLimit { effective_since: 0, max: 100, period_days: Some(1) };
        let limits = TenantLimits { connection_duration: Some(limit), ..Default::default() };
        let now = now_secs();
        let period = limit.period_start(now).expect("in effect");
        // A connection that has lasted 60 s and one closed after 50 s: 110 s used.
        let slot = counts.open("a", "d1", &limits).expect("nothing used yet");
        counts.tenants.lock().unwrap().get_mut("a").unwrap().devices.get_mut("d1").unwrap()[0]
            .since = now - 60;
        counts.tenants.lock().unwrap().get_mut("a").unwrap().closed = Used { period, amount: 50 };
        assert_eq!(counts.open("a", "d2", &limits).err(), Some("connection_duration"));
        assert!(counts.open("b", "d1", &limits).is_ok(), "another tenant has its own time");
        drop(slot);
        let closed = counts.tenants.lock().unwrap().get("a").map(|e| e.closed.amount);
        assert!(closed.is_some_and(|c| c >= 110), "its time was added at close: {closed:?}");
        assert_eq!(counts.open("a", "d2", &limits).err(), Some("connection_duration"));
        assert!(counts.open("a", "d2", &TenantLimits::default()).is_ok(), "limit removed");
    }
}
