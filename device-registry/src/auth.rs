//! The service protocol adapters call to authenticate devices and look up registry data.
//!
//! Hot path: a successful verification is cached under (tenant, type, auth-id) together
//! with an HMAC-SHA256 of the presented secret under a random per-process key; a
//! reconnect presenting the same secret costs one HMAC and a map look-up instead of an
//! argon2 run. The cache never holds the secret itself, and the MAC key never leaves
//! the process. Argon2/bcrypt run on the bounded [`HashPool`].
//!
//! Failures are remembered per (tenant, auth-id): the same wrong secret is refused without
//! hashing again, and more than `max_failures` failures within `failure_window` refuse
//! every attempt until the window ends.
//!
//! Invalidation: a task follows the store's [`Change`] stream (local writes at once,
//! other instances' writes through Redis pub/sub). Every change gets a sequence number;
//! each cache entry remembers the sequence number observed *before* its data was read,
//! and is valid only while no change for its device, its tenant, or everything has a
//! higher number. So an entry built from data read before a change can never outlive it,
//! even if it is inserted after the change was processed.
//!
//! Size: one service, one state lock: the verification cache, the failure memory, the
//! tenant/device look-up caches and their invalidation share it, and splitting them across
//! files would put the lock discipline in several places.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::Utc;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::management::HashPool;
use crate::model::{
    AdapterAccess, CredentialType, Credentials, Device, DeviceId, SecretMeta, Tenant, TenantId,
};
use crate::password;
use crate::store::{Change, RegistryStore, StoreError};
use crate::x509::{CertError, ClientCertificate, TrustAnchor};

/// How failures of one auth-id are counted: per source address, and all sources together.
type FailureKey = (TenantId, String, Option<std::net::IpAddr>);

/// With a source address, the failures of all sources together may reach this many times
/// `max_failures` (one source's own may reach `max_failures`).
pub const SOURCES_FACTOR: u32 = 20;

/// The failure entry for `key` as of `now` (a new window once the old one is over).
fn failures_entry<'m>(
    failures: &'m mut HashMap<FailureKey, Failures>,
    key: &FailureKey,
    now: Instant,
    window: Duration,
) -> &'m mut Failures {
    let f = failures.entry(key.clone()).or_insert(Failures {
        count: 0,
        since: now,
        last_mac: None,
        in_flight: 0,
    });
    if now.duration_since(f.since) >= window {
        *f = Failures { count: 0, since: now, last_mac: None, in_flight: f.in_flight };
    }
    f
}

/// Releases an attempt's place among the running verifications of its auth-id.
struct InFlight<'a> {
    service: &'a AuthService,
    key: &'a FailureKey,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.service.state().failures.get_mut(self.key) {
            f.in_flight = f.in_flight.saturating_sub(1);
        }
    }
}

/// An argon2id hash of nothing in particular, with the parameters new passwords get:
/// verified for unknown auth-ids so that they cost as much as known ones.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| password::hash_plain("decoy password, never valid").unwrap_or_default())
}

/// Why authentication or a look-up failed. Adapters map these to protocol codes in one
/// place (e.g. MQTT: `BadCredentials` 0x04/0x86, `*Disabled` 0x05/0x87, `RateLimited` and
/// `Unavailable` 0x03/0x88).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// Unknown tenant or auth-id, wrong secret, or no enabled, currently valid secret.
    #[error("bad credentials")]
    BadCredentials,
    /// The tenant exists but is disabled.
    #[error("tenant disabled")]
    TenantDisabled,
    /// The device exists but is disabled.
    #[error("device disabled")]
    DeviceDisabled,
    /// A look-up ([`AuthService::authorize_device`]) found no such tenant. Authentication
    /// never says so (it answers `BadCredentials`).
    #[error("unknown tenant")]
    UnknownTenant,
    /// A look-up found no such device.
    #[error("unknown device")]
    UnknownDevice,
    /// A look-up found that the gateway does not exist, is disabled, or may not act for
    /// the device.
    #[error("gateway not authorised for this device")]
    GatewayNotAuthorized,
    /// Too many recent failures for this auth-id.
    #[error("too many failed attempts; try later")]
    RateLimited,
    /// The verification pool is saturated (server busy; the client should retry).
    #[error("registry busy")]
    Busy,
    /// The registry's storage or hashing pool is unavailable.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for AuthError {
    fn from(e: StoreError) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Who a successful authentication identified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthenticatedDevice {
    /// The device's tenant.
    pub tenant: TenantId,
    /// The device.
    pub device: DeviceId,
    /// The auth-id used.
    pub auth_id: String,
    /// The credential type used.
    pub cred_type: CredentialType,
}

/// A pre-shared key for a DTLS handshake. Debug output hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PskKey {
    /// The device the key belongs to.
    pub device: DeviceId,
    /// The key bytes.
    pub key: Vec<u8>,
}

impl fmt::Debug for PskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PskKey").field("device", &self.device).field("key", &"<redacted>").finish()
    }
}

/// Tuning of [`AuthService`]; see `RegistryConfig` for defaults.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    /// How long a successful verification stays cached (also bounds staleness if a
    /// change notification is lost).
    pub cache_ttl: Duration,
    /// How long tenant/device look-ups stay cached.
    pub lookup_ttl: Duration,
    /// Failures tolerated per (tenant, auth-id) within `failure_window`.
    pub max_failures: u32,
    /// Window for `max_failures`; also how long a wrong secret is remembered.
    pub failure_window: Duration,
    /// Bound on entries in each cache.
    pub max_entries: usize,
    /// Password verifiers that survive a restart (`[registry] verifier_key_file`); `None`:
    /// every fresh process verifies each device with argon2 once.
    pub verifiers: Option<Arc<crate::verifiers::Verifiers>>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            cache_ttl: Duration::from_secs(300),
            lookup_ttl: Duration::from_secs(60),
            max_failures: 5,
            failure_window: Duration::from_secs(10),
            max_entries: 100_000,
            verifiers: None,
        }
    }
}

type Mac32 = [u8; 32];

/// HMAC-SHA256 under `key` of `parts`, each length-prefixed so that field boundaries
/// cannot be shifted (the verification cache's MAC, and the password verifiers').
pub(crate) fn keyed_mac(key: &Hmac<Sha256>, parts: &[&[u8]]) -> Mac32 {
    let mut m = key.clone();
    for part in parts {
        m.update(&(part.len() as u64).to_be_bytes());
        m.update(part);
    }
    m.finalize().into_bytes().into()
}

struct AuthEntry {
    mac: Mac32,
    device: AuthenticatedDevice,
    window: SecretMeta,
    seq: u64,
    expires: Instant,
}

struct Failures {
    count: u32,
    since: Instant,
    last_mac: Option<Mac32>,
    /// Verifications running now: they count against `max_failures` from the moment
    /// they start, so concurrency cannot multiply guesses.
    in_flight: u32,
}

/// A cached look-up; the value is shared (`Arc`): a cache hit costs a reference count,
/// not a deep clone of the tenant (with its CA certificates) or the device.
struct Cached<T> {
    value: Option<Arc<T>>,
    seq: u64,
    expires: Instant,
}

#[derive(Default)]
struct Changes {
    all: u64,
    tenants: HashMap<TenantId, (u64, Instant)>,
    /// Latest change to any tenant (trust anchors depend on all of them).
    any_tenant: u64,
    devices: HashMap<(TenantId, DeviceId), (u64, Instant)>,
}

/// Records `key` as changed at `seq` in `log`, which keeps at most `max` records: those
/// older than `horizon` go first; if that is not enough the whole log is dropped and
/// `true` returned (the caller must then treat everything as changed).
fn record_bounded<K: Eq + std::hash::Hash>(
    log: &mut HashMap<K, (u64, Instant)>,
    key: K,
    seq: u64,
    now: Instant,
    horizon: Duration,
    max: usize,
) -> bool {
    let mut dropped = false;
    if log.len() >= max {
        log.retain(|_, (_, at)| now.duration_since(*at) < horizon);
        if log.len() >= max {
            log.clear();
            dropped = true;
        }
    }
    log.insert(key, (seq, now));
    dropped
}

impl Changes {
    fn latest(&self, t: &TenantId, d: Option<&DeviceId>) -> u64 {
        let mut s = self.all;
        if let Some((c, _)) = self.tenants.get(t) {
            s = s.max(*c);
        }
        if let Some(d) = d {
            // Keyed by owned ids; the clone is only paid on cache hits that reach here.
            if let Some((c, _)) = self.devices.get(&(t.clone(), d.clone())) {
                s = s.max(*c);
            }
        }
        s
    }
}

#[derive(Default)]
struct State {
    auth: HashMap<(TenantId, CredentialType, String), AuthEntry>,
    /// By (tenant, auth-id, source address); `None`: all sources together.
    failures: HashMap<FailureKey, Failures>,
    tenants: HashMap<TenantId, Cached<Tenant>>,
    devices: HashMap<(TenantId, DeviceId), Cached<Device>>,
    anchors: Option<Cached<Vec<TrustAnchor>>>,
    changes: Changes,
}

struct Inner {
    store: Arc<dyn RegistryStore>,
    pool: HashPool,
    settings: AuthSettings,
    mac_key: Hmac<Sha256>,
    seq: AtomicU64,
    state: Mutex<State>,
    /// Changes once the caches have followed them ([`AuthService::applied_changes`]).
    applied: tokio::sync::broadcast::Sender<Change>,
    /// Stops the change-following task when the last handle is dropped.
    _stop: DropGuard,
}

/// Authentication and look-ups for protocol adapters; cheap to clone.
#[derive(Clone)]
pub struct AuthService {
    inner: Arc<Inner>,
}

impl fmt::Debug for AuthService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthService")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// Caps a map at `max` entries: drop expired ones first, then arbitrary ones (a cache
/// miss only costs a re-verification).
fn bound<K, V>(map: &mut HashMap<K, V>, max: usize, expired: impl Fn(&V) -> bool) {
    if map.len() < max {
        return;
    }
    map.retain(|_, v| !expired(v));
    if map.len() >= max {
        let excess = map.len() + 1 - max / 2;
        let mut n = 0;
        map.retain(|_, _| {
            n += 1;
            n > excess
        });
    }
}

impl AuthService {
    /// Starts the service over `store`, verifying on `pool`. Must be called inside a
    /// tokio runtime: it spawns the task following the store's changes.
    pub fn new(store: Arc<dyn RegistryStore>, pool: HashPool, settings: AuthSettings) -> Self {
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        let mac_key =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC accepts any key length");
        let rx = store.subscribe();
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            store,
            pool,
            settings,
            mac_key,
            seq: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            applied: tokio::sync::broadcast::channel(crate::store::CHANGE_CHANNEL_CAPACITY).0,
            _stop: stop.clone().drop_guard(),
        });
        tokio::spawn(follow_changes(Arc::downgrade(&inner), rx, stop));
        Self { inner }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only cache data behind: keep going.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mac(&self, tenant: &TenantId, t: CredentialType, auth_id: &str, secret: &[u8]) -> Mac32 {
        let parts = [tenant.as_str().as_bytes(), t.as_str().as_bytes(), auth_id.as_bytes(), secret];
        keyed_mac(&self.inner.mac_key, &parts)
    }

    /// Drops every cached entry and remembered failure (e.g. after an outage).
    pub fn clear(&self) {
        let mut s = self.state();
        s.auth.clear();
        s.failures.clear();
        s.tenants.clear();
        s.anchors = None;
        s.devices.clear();
    }

    /// Authenticates a device presenting `secret` for (tenant, type, auth-id).
    ///
    /// For `hashed-password` the secret is the password; for `psk` the key; for
    /// `x509-cert` the adapter has already validated the certificate chain, `auth_id` is
    /// the subject DN and `secret` is ignored (only enablement and validity are checked).
    ///
    /// # Errors
    /// See [`AuthError`].
    pub async fn authenticate(
        &self,
        tenant: &str,
        cred_type: CredentialType,
        auth_id: &str,
        secret: &[u8],
    ) -> Result<AuthenticatedDevice, AuthError> {
        self.authenticate_from(tenant, cred_type, auth_id, secret, None).await
    }

    /// As [`AuthService::authenticate`], for a client at `source`: failures then count
    /// per (tenant, auth-id, source address) against `max_failures`, and per (tenant,
    /// auth-id) from all sources against [`SOURCES_FACTOR`] × `max_failures`, so that a
    /// guessing source locks out only itself (and a device with a recently verified secret
    /// passes anyway).
    ///
    /// # Errors
    /// See [`AuthError`].
    pub async fn authenticate_from(
        &self,
        tenant: &str,
        cred_type: CredentialType,
        auth_id: &str,
        secret: &[u8],
        source: Option<std::net::IpAddr>,
    ) -> Result<AuthenticatedDevice, AuthError> {
        let Ok(tenant) = TenantId::new(tenant) else {
            return Err(AuthError::BadCredentials);
        };
        let mac = self.mac(&tenant, cred_type, auth_id, secret);
        let now = Instant::now();
        let max = self.inner.settings.max_failures;
        // (key, limit): the source's own, and with a source also all sources together.
        let mut keys = vec![((tenant.clone(), auth_id.to_owned(), source), max)];
        if source.is_some() {
            keys.push((
                (tenant.clone(), auth_id.to_owned(), None),
                max.saturating_mul(SOURCES_FACTOR),
            ));
        }
        {
            let mut s = self.state();
            let key = (tenant.clone(), cred_type, auth_id.to_owned());
            if let Some(e) = s.auth.get(&key) {
                let fresh =
                    e.expires > now && e.seq >= s.changes.latest(&tenant, Some(&e.device.device));
                if fresh && bool::from(e.mac.ct_eq(&mac)) && e.window.usable_at(Utc::now()) {
                    return Ok(e.device.clone());
                }
                if !fresh {
                    s.auth.remove(&key);
                }
            }
            let window = self.inner.settings.failure_window;
            bound(&mut s.failures, self.inner.settings.max_entries, |f| {
                f.in_flight == 0 && now.duration_since(f.since) >= window
            });
            for (fkey, limit) in &keys {
                let f = failures_entry(&mut s.failures, fkey, now, window);
                if f.count + f.in_flight >= *limit {
                    return Err(AuthError::RateLimited);
                }
            }
            if failures_entry(&mut s.failures, &keys[0].0, now, window)
                .last_mac
                .is_some_and(|m| bool::from(m.ct_eq(&mac)))
            {
                return Err(AuthError::BadCredentials);
            }
            // Counted from now: released when this attempt ends, however it ends.
            for (fkey, _) in &keys {
                failures_entry(&mut s.failures, fkey, now, window).in_flight += 1;
            }
        }
        let _running: Vec<InFlight<'_>> =
            keys.iter().map(|(key, _)| InFlight { service: self, key }).collect();
        let seq = self.inner.seq.load(Ordering::SeqCst);
        match self.verify(&tenant, cred_type, auth_id, secret).await {
            Ok((device, window)) => {
                let mut s = self.state();
                // A success clears the source's failures (others' stay counted).
                if let Some(f) = s.failures.get_mut(&keys[0].0) {
                    f.count = 0;
                    f.last_mac = None;
                }
                let max = self.inner.settings.max_entries;
                bound(&mut s.auth, max, |e| e.expires <= now);
                s.auth.insert(
                    (tenant, cred_type, auth_id.to_owned()),
                    AuthEntry {
                        mac,
                        device: device.clone(),
                        window,
                        seq,
                        expires: now + self.inner.settings.cache_ttl,
                    },
                );
                Ok(device)
            }
            Err(AuthError::BadCredentials) => {
                let mut s = self.state();
                let window = self.inner.settings.failure_window;
                // Remember the wrong secret only if no change happened while verifying:
                // otherwise it may have been judged against stale data.
                let last_mac = (self.inner.seq.load(Ordering::SeqCst) == seq).then_some(mac);
                for (i, (fkey, _)) in keys.iter().enumerate() {
                    let f = failures_entry(&mut s.failures, fkey, now, window);
                    f.count += 1;
                    if i == 0 {
                        f.last_mac = last_mac;
                    }
                }
                // Never log the secret; the auth-id is not confidential.
                tracing::debug!(auth_id, "authentication failed");
                Err(AuthError::BadCredentials)
            }
            Err(e) => Err(e),
        }
    }

    /// The uncached path: read the registry and verify.
    async fn verify(
        &self,
        tenant: &TenantId,
        cred_type: CredentialType,
        auth_id: &str,
        secret: &[u8],
    ) -> Result<(AuthenticatedDevice, SecretMeta), AuthError> {
        let store = &self.inner.store;
        let Some(t) = store.get_tenant(tenant).await? else {
            return Err(AuthError::BadCredentials);
        };
        if !t.value.enabled {
            return Err(AuthError::TenantDisabled);
        }
        let Some((device_id, creds)) = store.find_credentials(tenant, cred_type, auth_id).await?
        else {
            if cred_type == CredentialType::HashedPassword {
                // As slow as a known auth-id: timing must not tell which ones exist.
                let presented = secret.to_vec();
                let _ = self
                    .inner
                    .pool
                    .run(move || {
                        password::verify(password::ARGON2ID, decoy_hash(), None, &presented)
                    })
                    .await;
            }
            return Err(AuthError::BadCredentials);
        };
        let Some(device) = store.get_device(tenant, &device_id).await? else {
            return Err(AuthError::BadCredentials);
        };
        if !device.value.enabled {
            return Err(AuthError::DeviceDisabled);
        }
        if !creds.enabled() {
            return Err(AuthError::BadCredentials);
        }
        let now = Utc::now();
        let matched: Option<SecretMeta> = match creds {
            Credentials::HashedPassword(p) => {
                let candidates: Vec<(String, String, Option<String>, SecretMeta)> = p
                    .secrets
                    .into_iter()
                    .filter(|s| s.meta.usable_at(now))
                    .filter_map(|s| Some((s.hash_function?, s.pwd_hash?, s.salt, s.meta)))
                    .collect();
                let verifiers = self.inner.settings.verifiers.as_deref();
                fn record(
                    (f, h, salt, _): &(String, String, Option<String>, SecretMeta),
                ) -> crate::verifiers::HashRecord<'_> {
                    crate::verifiers::HashRecord { function: f, hash: h, salt: salt.as_deref() }
                }
                // A verifier remembered from an earlier process (this instance's file, or
                // the store every instance of a cluster shares): no argon2 run.
                let mut known = verifiers.and_then(|v| {
                    candidates.iter().find(|c| v.matches(tenant, auth_id, record(c), secret))
                });
                if let (None, Some(v), false) = (known, verifiers, candidates.is_empty()) {
                    let shared = store.get_verifier(tenant, auth_id).await.unwrap_or_else(|e| {
                        tracing::debug!(error = %e, "shared password verifier not read");
                        None
                    });
                    known = shared.and_then(|value| {
                        candidates
                            .iter()
                            .find(|c| v.matches_shared(&value, tenant, auth_id, record(c), secret))
                    });
                    if let Some(c) = known {
                        v.remember(tenant, auth_id, record(c), secret);
                    }
                }
                if let Some(c) = known {
                    metrics::counter!("ferrule_password_checks_total", "method" => "verifier")
                        .increment(1);
                    Some(c.3.clone())
                } else if candidates.is_empty() {
                    None
                } else {
                    metrics::counter!("ferrule_password_checks_total", "method" => "hash")
                        .increment(1);
                    let presented = secret.to_vec();
                    let found = self
                        .inner
                        .pool
                        .run(move || {
                            candidates.into_iter().find(|(f, h, salt, _)| {
                                password::verify(f, h, salt.as_deref(), &presented)
                            })
                        })
                        .await
                        .map_err(|e| match e {
                            ferrule_net::hashing::PoolError::Busy => AuthError::Busy,
                            other => AuthError::Unavailable(other.to_string()),
                        })?;
                    if let (Some(c), Some(v)) = (&found, verifiers) {
                        v.remember(tenant, auth_id, record(c), secret);
                        let value = v.shared_value(tenant, auth_id, record(c), secret);
                        if let Err(e) = store.put_verifier(tenant, auth_id, &value).await {
                            tracing::debug!(error = %e, "shared password verifier not written");
                        }
                    }
                    found.map(|c| c.3)
                }
            }
            Credentials::Psk(p) => {
                p.secrets.into_iter().filter(|s| s.meta.usable_at(now)).find_map(|s| {
                    let key = base64::engine::general_purpose::STANDARD.decode(s.key?).ok()?;
                    (key.len() == secret.len() && bool::from(key.ct_eq(secret))).then_some(s.meta)
                })
            }
            Credentials::X509Cert(x) => match x.secrets {
                None => Some(SecretMeta::default()),
                Some(secrets) => secrets.into_iter().map(|s| s.meta).find(|m| m.usable_at(now)),
            },
            Credentials::Rpk(_) => None,
        };
        let window = matched.ok_or(AuthError::BadCredentials)?;
        Ok((
            AuthenticatedDevice {
                tenant: tenant.clone(),
                device: device_id,
                auth_id: auth_id.to_owned(),
                cred_type,
            },
            window,
        ))
    }

    /// Authenticates a device by the X.509 certificate it presented in a TLS handshake
    /// (DER, the end-entity certificate): see [`crate::x509`] for the checks. The
    /// certificate's subject DN is the auth-id of an `x509-cert` credential in the one
    /// tenant whose trusted CA issued it.
    ///
    /// # Errors
    /// [`AuthError::BadCredentials`] for a malformed, expired, untrusted or non-client
    /// (CA, KeyUsage/ExtendedKeyUsage) certificate, an issuer trusted by several tenants,
    /// or an unknown subject; otherwise as [`AuthService::authenticate`].
    pub async fn authenticate_certificate(
        &self,
        der: &[u8],
    ) -> Result<AuthenticatedDevice, AuthError> {
        let now = Utc::now();
        let cert = ClientCertificate::parse(der, now).map_err(|e| {
            tracing::debug!(reason = %e, "client certificate refused");
            AuthError::BadCredentials
        })?;
        let anchors = self.trust_anchors().await?;
        // The issuer's name selects one tenant, whatever the anchors' validity: a subject
        // DN trusted by two tenants (stored before uniqueness was enforced) must not let
        // the first tenant in key order take the other's devices.
        let named: Vec<&TrustAnchor> = anchors.iter().filter(|a| cert.issuer_named_by(a)).collect();
        let Some(first) = named.first() else {
            let reason = CertError::UnknownIssuer(cert.issuer_dn.clone());
            tracing::debug!(subject = %cert.subject_dn, %reason, "client certificate refused");
            return Err(AuthError::BadCredentials);
        };
        if let Some(other) = named.iter().find(|a| a.tenant != first.tenant) {
            tracing::warn!(
                reason = %CertError::AmbiguousIssuer(cert.issuer_dn.clone()),
                tenants = %format!("{}, {}", first.tenant, other.tenant),
                "client certificate refused: keep a CA subject DN in one tenant's trusted-ca only"
            );
            return Err(AuthError::BadCredentials);
        }
        let mut refusal = CertError::UnknownIssuer(cert.issuer_dn.clone());
        // Several anchors are the same tenant's CAs with one subject (e.g. a key roll-over).
        for anchor in named.iter().filter(|a| a.valid_at(now)) {
            match cert.verify_issued_by(anchor) {
                Ok(()) => {
                    // The secret is the certificate itself: a cached verification is only
                    // reused for the very same certificate.
                    let tenant = anchor.tenant.as_str();
                    let result = self
                        .authenticate(
                            tenant,
                            CredentialType::X509Cert,
                            &cert.subject_dn,
                            cert.der(),
                        )
                        .await;
                    if result.is_err() {
                        let reason = CertError::UnknownSubject;
                        tracing::debug!(subject = %cert.subject_dn, %reason, "client certificate refused");
                    }
                    return result;
                }
                Err(e @ CertError::BadSignature) => refusal = e,
                Err(_) => {}
            }
        }
        tracing::debug!(subject = %cert.subject_dn, reason = %refusal, "client certificate refused");
        Err(AuthError::BadCredentials)
    }

    /// Every tenant's decoded trusted CAs, cached for `lookup_ttl` and dropped on any
    /// tenant change.
    async fn trust_anchors(&self) -> Result<Arc<Vec<TrustAnchor>>, AuthError> {
        let now = Instant::now();
        {
            let s = self.state();
            if let Some(c) = &s.anchors {
                if c.expires > now && c.seq >= s.changes.all.max(s.changes.any_tenant) {
                    if let Some(v) = &c.value {
                        return Ok(v.clone());
                    }
                }
            }
        }
        let seq = self.inner.seq.load(Ordering::SeqCst);
        let tenants = self.inner.store.list_tenants().await?;
        let anchors: Vec<TrustAnchor> = tenants
            .iter()
            .filter(|(_, t)| t.value.enabled)
            .flat_map(|(id, t)| {
                t.value
                    .trusted_ca
                    .iter()
                    .flatten()
                    .filter_map(move |ca| TrustAnchor::from_trusted_ca(id, ca))
            })
            .collect();
        let anchors = Arc::new(anchors);
        self.state().anchors = Some(Cached {
            value: Some(anchors.clone()),
            seq,
            expires: now + self.inner.settings.lookup_ttl,
        });
        Ok(anchors)
    }

    /// The PSK for a DTLS handshake with identity `auth_id@tenant`: the key of the first
    /// enabled, currently valid secret of an enabled device in an enabled tenant.
    ///
    /// # Errors
    /// See [`AuthError`].
    /// Whether the `cred_type` credential `auth_id` of `tenant` still belongs to `device`
    /// and is enabled (a connection it authenticated may stay open). Read from the store,
    /// not the caches: asked after a registry change.
    ///
    /// # Errors
    /// [`AuthError::Unavailable`] if the store fails.
    pub async fn credential_usable(
        &self,
        tenant: &str,
        cred_type: CredentialType,
        auth_id: &str,
        device: &str,
    ) -> Result<bool, AuthError> {
        let Ok(tenant) = TenantId::new(tenant) else { return Ok(false) };
        let found = self.inner.store.find_credentials(&tenant, cred_type, auth_id).await?;
        Ok(found
            .is_some_and(|(owner, credentials)| owner.as_str() == device && credentials.enabled()))
    }

    pub async fn psk_for(&self, tenant: &str, auth_id: &str) -> Result<PskKey, AuthError> {
        let Ok(tenant) = TenantId::new(tenant) else {
            return Err(AuthError::BadCredentials);
        };
        let t = self.get_tenant(&tenant).await?.ok_or(AuthError::BadCredentials)?;
        if !t.enabled {
            return Err(AuthError::TenantDisabled);
        }
        let Some((device_id, Credentials::Psk(p))) =
            self.inner.store.find_credentials(&tenant, CredentialType::Psk, auth_id).await?
        else {
            return Err(AuthError::BadCredentials);
        };
        let d = self.get_device(&tenant, &device_id).await?.ok_or(AuthError::BadCredentials)?;
        if !d.enabled {
            return Err(AuthError::DeviceDisabled);
        }
        if !p.enabled {
            return Err(AuthError::BadCredentials);
        }
        let now = Utc::now();
        p.secrets
            .into_iter()
            .filter(|s| s.meta.usable_at(now))
            .find_map(|s| base64::engine::general_purpose::STANDARD.decode(s.key?).ok())
            .map(|key| PskKey { device: device_id, key })
            .ok_or(AuthError::BadCredentials)
    }

    /// A tenant, through the look-up cache (`None`: no such tenant).
    ///
    /// # Errors
    /// [`AuthError::Unavailable`] if the store fails.
    pub async fn get_tenant(&self, tenant: &TenantId) -> Result<Option<Arc<Tenant>>, AuthError> {
        let now = Instant::now();
        {
            let s = self.state();
            if let Some(c) = s.tenants.get(tenant) {
                if c.expires > now && c.seq >= s.changes.latest(tenant, None) {
                    return Ok(c.value.clone());
                }
            }
        }
        let seq = self.inner.seq.load(Ordering::SeqCst);
        let value = self.inner.store.get_tenant(tenant).await?.map(|v| Arc::new(v.value));
        let mut s = self.state();
        bound(&mut s.tenants, self.inner.settings.max_entries, |c| c.expires <= now);
        s.tenants.insert(
            tenant.clone(),
            Cached { value: value.clone(), seq, expires: now + self.inner.settings.lookup_ttl },
        );
        Ok(value)
    }

    /// A device, through the look-up cache (`None`: no such device).
    ///
    /// # Errors
    /// [`AuthError::Unavailable`] if the store fails.
    pub async fn get_device(
        &self,
        tenant: &TenantId,
        device: &DeviceId,
    ) -> Result<Option<Arc<Device>>, AuthError> {
        let now = Instant::now();
        let key = (tenant.clone(), device.clone());
        {
            let s = self.state();
            if let Some(c) = s.devices.get(&key) {
                if c.expires > now && c.seq >= s.changes.latest(tenant, Some(device)) {
                    return Ok(c.value.clone());
                }
            }
        }
        let seq = self.inner.seq.load(Ordering::SeqCst);
        let value = self.inner.store.get_device(tenant, device).await?.map(|v| Arc::new(v.value));
        let mut s = self.state();
        bound(&mut s.devices, self.inner.settings.max_entries, |c| c.expires <= now);
        s.devices.insert(
            key,
            Cached { value: value.clone(), seq, expires: now + self.inner.settings.lookup_ttl },
        );
        Ok(value)
    }

    /// Checks that `device` exists and is enabled in an enabled `tenant` and, with
    /// `gateway`, that the gateway exists, is enabled and may act for the device
    /// (`via`, or `viaGroups` against the gateway's `memberOf`).
    ///
    /// # Errors
    /// `UnknownTenant`, `TenantDisabled`, `UnknownDevice`, `DeviceDisabled`;
    /// `GatewayNotAuthorized` for a gateway that does not exist, is disabled or may not act
    /// for the device; `Unavailable`.
    pub async fn authorize_device(
        &self,
        tenant: &str,
        device: &str,
        gateway: Option<&str>,
    ) -> Result<(), AuthError> {
        let t = TenantId::new(tenant).map_err(|_| AuthError::UnknownTenant)?;
        let d = DeviceId::new(device).map_err(|_| AuthError::UnknownDevice)?;
        let tv = self.get_tenant(&t).await?.ok_or(AuthError::UnknownTenant)?;
        if !tv.enabled {
            return Err(AuthError::TenantDisabled);
        }
        let dv = self.get_device(&t, &d).await?.ok_or(AuthError::UnknownDevice)?;
        if !dv.enabled {
            return Err(AuthError::DeviceDisabled);
        }
        if let Some(g) = gateway.filter(|g| *g != device) {
            let gid = DeviceId::new(g).map_err(|_| AuthError::GatewayNotAuthorized)?;
            let gv = self.get_device(&t, &gid).await?.ok_or(AuthError::GatewayNotAuthorized)?;
            if !gv.enabled || !dv.is_served_by(g, Some(&gv)) {
                return Err(AuthError::GatewayNotAuthorized);
            }
        }
        Ok(())
    }

    /// How `tenant` lets its devices use `adapter_type` ([`Tenant::access`]); nothing
    /// for an unknown tenant.
    ///
    /// # Errors
    /// [`AuthError::Unavailable`] if the store fails.
    pub async fn adapter_access(
        &self,
        tenant: &str,
        adapter_type: &str,
    ) -> Result<AdapterAccess, AuthError> {
        let Ok(t) = TenantId::new(tenant) else {
            return Ok(AdapterAccess::default());
        };
        Ok(self.get_tenant(&t).await?.map(|t| t.access(adapter_type)).unwrap_or_default())
    }

    fn record_change(&self, change: &Change) {
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let now = Instant::now();
        let mut s = self.state();
        // Records older than every cache TTL cannot invalidate a live entry any more.
        let horizon = self
            .inner
            .settings
            .cache_ttl
            .max(self.inner.settings.lookup_ttl)
            .max(self.inner.settings.failure_window);
        let max = self.inner.settings.max_entries;
        match change {
            Change::All => {
                s.failures.clear();
                s.changes.all = seq;
                s.changes.tenants.clear();
                s.changes.devices.clear();
            }
            Change::Tenant(t) => {
                // A registry change may make a refused secret valid: forget failures.
                s.failures.retain(|(ft, _, _), _| ft != t);
                if record_bounded(&mut s.changes.tenants, t.clone(), seq, now, horizon, max) {
                    s.changes.all = seq;
                }
                s.changes.any_tenant = seq;
            }
            Change::Device(t, d) => {
                s.failures.retain(|(ft, _, _), _| ft != t);
                let key = (t.clone(), d.clone());
                if record_bounded(&mut s.changes.devices, key, seq, now, horizon, max) {
                    s.changes.all = seq;
                }
            }
        }
    }

    /// How many successful verifications are cached (for tests and metrics).
    pub fn cached_verifications(&self) -> usize {
        self.state().auth.len()
    }
}

/// Follows store changes until `stop` or until the service is dropped.
async fn follow_changes(
    inner: std::sync::Weak<Inner>,
    mut rx: tokio::sync::broadcast::Receiver<Change>,
    stop: CancellationToken,
) {
    loop {
        let change = tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.recv() => match r {
                Ok(c) => c,
                // Missed some: everything may be stale.
                Err(RecvError::Lagged(_)) => Change::All,
                Err(RecvError::Closed) => return,
            },
        };
        let Some(inner) = inner.upgrade() else { return };
        AuthService { inner: inner.clone() }.record_change(&change);
        let _ = inner.applied.send(change);
    }
}

impl AuthService {
    /// Registry changes, each sent once this service's caches have followed it (so that a
    /// look-up made on receipt sees the change): what protocol adapters watch to close the
    /// connections of devices that are no longer allowed. A receiver that lags gets
    /// `Lagged` and must treat it as [`Change::All`].
    pub fn applied_changes(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.applied.subscribe()
    }

    /// The latest change sequence number processed: it grows with every registry change
    /// this service's caches followed (and with every lag, which counts as a change to
    /// everything), so an answer obtained while it stayed the same is still this
    /// service's answer. Adapters memoise per connection against it.
    pub fn change_seq(&self) -> u64 {
        self.inner.seq.load(Ordering::SeqCst)
    }
}
