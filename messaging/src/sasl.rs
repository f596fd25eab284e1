//! SASL for applications: PLAIN (`name@tenant`) against configured users, and ANONYMOUS
//! only where configured. fe2o3-amqp's `SaslAcceptor` is synchronous and keeps the result
//! to itself, so each connection gets an acceptor holding a cell for the identity.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use argon2::password_hash::PasswordVerifier;
use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{SaslConfig, UserConfig};
use ferrule_net::hashing::HashPool;

/// Who an application connection authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The SASL authentication id (`name@tenant`, or `anonymous`).
    pub user: String,
    /// The tenant whose addresses it may use; `None` for anonymous (all tenants).
    pub tenant: Option<String>,
}

impl Identity {
    /// May this identity use `address`?
    pub fn may_use(&self, address: &str) -> bool {
        match &self.tenant {
            None => true,
            Some(tenant) => crate::address::tenant_of(address) == Some(tenant.as_str()),
        }
    }
}

/// Checks application credentials, with bounded work and a memory of failures.
///
/// - A successful login is cached for [`SUCCESS_TTL`] as an HMAC of the password under
///   a random per-process key (never the password): the same application reconnecting
///   costs one HMAC, not an argon2 run, and passes even while its user name is under
///   attack.
/// - Attempts are counted when they *start*: per (user, source address) at most
///   [`MAX_FAILURES_PER_SOURCE`] failed or running attempts within [`FAILURE_WINDOW`],
///   per user at most [`MAX_FAILURES_PER_USER`] from all sources together, so that
///   concurrency cannot multiply guesses and one source cannot lock a user out for
///   everyone else. The same wrong password from the same source is refused without
///   hashing again.
/// - argon2 verifications run on the platform's one bounded [`HashPool`], shared with
///   device logins and management writes; when its queue is full a login is refused with
///   `sys-temp` (the client retries).
/// - An unknown user costs the same argon2 run as a known one (no user enumeration by
///   timing), when any configured user has an argon2 password.
pub struct Authenticator {
    users: Vec<UserConfig>,
    allow_anonymous: bool,
    mac_key: Hmac<Sha256>,
    /// A hash to verify against when the user is unknown (same cost as a real one).
    decoy: Option<String>,
    pool: HashPool,
    memory: Mutex<Memory>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("users", &self.users.len())
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

/// How long a successful login is remembered.
pub const SUCCESS_TTL: Duration = Duration::from_secs(300);
/// The window in which failures count.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(10);
/// Failed (or running) attempts per (user, source address) within the window.
pub const MAX_FAILURES_PER_SOURCE: u32 = 5;
/// Failed (or running) attempts per user from all sources within the window.
pub const MAX_FAILURES_PER_USER: u32 = 100;
/// Entries per table of the failure memory and the success cache.
const MAX_ENTRIES: usize = 100_000;

/// Argon2 verifications allowed at once when no pool is shared in: one per core (each
/// takes a core for tens of milliseconds and 19 MiB).
pub fn max_verifications() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(2)
}

type Mac32 = [u8; 32];

#[derive(Default)]
struct Memory {
    succeeded: HashMap<String, (Mac32, Instant)>,
    by_source: HashMap<(String, IpAddr), Attempts>,
    by_user: HashMap<String, Attempts>,
}

#[derive(Clone, Copy)]
struct Attempts {
    /// Failed and running attempts since `since`.
    count: u32,
    since: Instant,
    /// The last wrong password's MAC (from this source).
    last_wrong: Option<Mac32>,
}

impl Attempts {
    fn fresh(now: Instant) -> Self {
        Self { count: 0, since: now, last_wrong: None }
    }

    /// The entry as of `now`: a new window once the old one is over.
    fn current(entry: Option<&Attempts>, now: Instant) -> Attempts {
        match entry {
            Some(a) if now.duration_since(a.since) < FAILURE_WINDOW => *a,
            _ => Attempts::fresh(now),
        }
    }
}

/// The result of a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted(Identity),
    /// Wrong user or password.
    Denied,
    /// Refused without verifying: too many attempts, or a wrong password repeated.
    Throttled,
    /// Too many verifications running; try again.
    Busy,
}

impl Authenticator {
    /// An authenticator with a pool of its own ([`max_verifications`] at once).
    pub fn new(config: &SaslConfig) -> Self {
        Self::with_pool(config, HashPool::new(max_verifications()))
    }

    /// An authenticator whose argon2 runs share `pool` with the rest of the platform.
    pub fn with_pool(config: &SaslConfig, pool: HashPool) -> Self {
        let key: [u8; 32] = rand::random();
        let mac_key =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC takes any key length");
        // A decoy with the parameters of the first argon2 user: as slow as a real check.
        let decoy = config.users.iter().find(|u| u.password.starts_with("$argon2")).map(|u| {
            let params = argon2::password_hash::phc::PasswordHash::new(&u.password)
                .ok()
                .and_then(|h| argon2::Params::try_from(&h).ok())
                .unwrap_or_default();
            let argon2 =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            argon2::password_hash::PasswordHasher::hash_password(&argon2, b"decoy")
                .map(|h| h.to_string())
                .unwrap_or_else(|_| u.password.clone())
        });
        Self {
            users: config.users.clone(),
            allow_anonymous: config.allow_anonymous,
            mac_key,
            decoy,
            pool,
            memory: Mutex::default(),
        }
    }

    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn mac(&self, authcid: &str, password: &[u8]) -> Mac32 {
        let mut m = self.mac_key.clone();
        m.update(&(authcid.len() as u64).to_be_bytes());
        m.update(authcid.as_bytes());
        m.update(password);
        m.finalize().into_bytes().into()
    }

    /// Verifies `user@tenant` / `password` presented from `source`.
    pub fn verify(&self, authcid: &str, password: &[u8], source: IpAddr) -> Verdict {
        let verdict = self.verify_inner(authcid, password, source);
        let outcome = match &verdict {
            Verdict::Accepted(_) => "ok",
            Verdict::Denied => "bad_credentials",
            Verdict::Throttled => "throttled",
            Verdict::Busy => "busy",
        };
        metrics::counter!("ferrule_auth_attempts_total", "type" => "sasl-plain", "outcome" => outcome).increment(1);
        verdict
    }

    fn verify_inner(&self, authcid: &str, password: &[u8], source: IpAddr) -> Verdict {
        let Some((name, tenant)) = authcid.rsplit_once('@') else { return Verdict::Denied };
        if name.is_empty() || tenant.is_empty() || tenant == "*" {
            return Verdict::Denied;
        }
        let mac = self.mac(authcid, password);
        let now = Instant::now();
        let source_key = (authcid.to_owned(), source);
        {
            let mut memory = self.memory();
            if let Some((good, expires)) = memory.succeeded.get(authcid) {
                if *expires > now && bool::from(good.ct_eq(&mac)) {
                    return Verdict::Accepted(identity(authcid, tenant));
                }
            }
            let by_source = Attempts::current(memory.by_source.get(&source_key), now);
            let by_user = Attempts::current(memory.by_user.get(authcid), now);
            let repeated = by_source.last_wrong.is_some_and(|wrong| bool::from(wrong.ct_eq(&mac)));
            if repeated
                || by_source.count >= MAX_FAILURES_PER_SOURCE
                || by_user.count >= MAX_FAILURES_PER_USER
            {
                return Verdict::Throttled;
            }
            // Counted now, before any work: a hundred concurrent guesses count as a hundred.
            bound(&mut memory.by_source, now);
            bound(&mut memory.by_user, now);
            memory
                .by_source
                .insert(source_key.clone(), Attempts { count: by_source.count + 1, ..by_source });
            memory
                .by_user
                .insert(authcid.to_owned(), Attempts { count: by_user.count + 1, ..by_user });
        }
        let wildcard = format!("{name}@*");
        let user = self.users.iter().find(|u| u.username == authcid || u.username == wildcard);
        let stored = user.map(|u| u.password.as_str()).or(self.decoy.as_deref());
        let matches = match stored {
            Some(stored) if stored.starts_with("$argon2") => {
                match self.pool.run_blocking(|| argon2_matches(stored, password)) {
                    Ok(matches) => matches,
                    Err(_) => {
                        self.forget_attempt(&source_key, now);
                        return Verdict::Busy;
                    }
                }
            }
            Some(stored) => stored.as_bytes().ct_eq(password).into(),
            None => false,
        };
        let accepted = matches && user.is_some();
        let mut memory = self.memory();
        if accepted {
            // A success clears this source's failures; the user's stay (other sources).
            memory.by_source.remove(&source_key);
            if memory.succeeded.len() >= MAX_ENTRIES {
                memory.succeeded.retain(|_, (_, expires)| *expires > now);
            }
            if memory.succeeded.len() < MAX_ENTRIES {
                memory.succeeded.insert(authcid.to_owned(), (mac, now + SUCCESS_TTL));
            }
            return Verdict::Accepted(identity(authcid, tenant));
        }
        if let Some(attempts) = memory.by_source.get_mut(&source_key) {
            attempts.last_wrong = Some(mac);
        }
        Verdict::Denied
    }

    /// Gives back an attempt counted for a login that was never judged (busy).
    fn forget_attempt(&self, source_key: &(String, IpAddr), now: Instant) {
        let mut memory = self.memory();
        for attempts in [memory.by_source.get_mut(source_key)].into_iter().flatten() {
            attempts.count = attempts.count.saturating_sub(1);
        }
        if let Some(attempts) = memory.by_user.get_mut(&source_key.0) {
            if now.duration_since(attempts.since) < FAILURE_WINDOW {
                attempts.count = attempts.count.saturating_sub(1);
            }
        }
    }
}

fn identity(authcid: &str, tenant: &str) -> Identity {
    Identity { user: authcid.to_owned(), tenant: Some(tenant.to_owned()) }
}

/// Keeps a failure table under [`MAX_ENTRIES`]: drops entries whose window is over.
fn bound<K: std::hash::Hash + Eq>(table: &mut HashMap<K, Attempts>, now: Instant) {
    if table.len() >= MAX_ENTRIES {
        table.retain(|_, a| now.duration_since(a.since) < FAILURE_WINDOW);
    }
}

fn argon2_matches(stored: &str, presented: &[u8]) -> bool {
    let Ok(hash) = argon2::password_hash::phc::PasswordHash::new(stored) else {
        tracing::error!("an application user's password hash is not a valid PHC string");
        return false;
    };
    argon2::Argon2::default().verify_password(presented, &hash).is_ok()
}

/// The per-connection SASL acceptor.
#[derive(Clone)]
pub(crate) struct ConnectionSasl {
    pub(crate) authenticator: Arc<Authenticator>,
    pub(crate) identity: Arc<OnceLock<Identity>>,
    /// The peer's address, for the failure memory.
    pub(crate) source: IpAddr,
}

const PLAIN: &str = "PLAIN";
const ANONYMOUS: &str = "ANONYMOUS";

impl ConnectionSasl {
    fn outcome(code: SaslCode) -> SaslServerFrame {
        SaslServerFrame::Outcome(SaslOutcome { code, additional_data: None })
    }
}

impl SaslAcceptor for ConnectionSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        let mut mechanisms = vec![Symbol::from(PLAIN)];
        if self.authenticator.allows_anonymous() {
            mechanisms.push(Symbol::from(ANONYMOUS));
        }
        Array::from(mechanisms)
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let verdict = match init.mechanism.as_str() {
            PLAIN => {
                let plain = init.initial_response.as_ref().and_then(|response| {
                    let mut parts = response.as_ref().split(|b| *b == 0);
                    let _authzid = parts.next()?;
                    let authcid = std::str::from_utf8(parts.next()?).ok()?;
                    Some((authcid, parts.next()?))
                });
                match plain {
                    Some((authcid, password)) => {
                        let verdict = self.authenticator.verify(authcid, password, self.source);
                        if !matches!(verdict, Verdict::Accepted(_)) {
                            tracing::info!(user = authcid, source = %self.source, ?verdict, "application authentication failed");
                        }
                        verdict
                    }
                    None => Verdict::Denied,
                }
            }
            ANONYMOUS if self.authenticator.allows_anonymous() => {
                Verdict::Accepted(Identity { user: "anonymous".into(), tenant: None })
            }
            _ => Verdict::Denied,
        };
        match verdict {
            Verdict::Accepted(identity) => {
                let _ = self.identity.set(identity);
                Self::outcome(SaslCode::Ok)
            }
            Verdict::Denied | Verdict::Throttled => Self::outcome(SaslCode::Auth),
            // RFC 4422 / AMQP 1.0 §5.3.3.6: a temporary failure; the client may retry.
            Verdict::Busy => Self::outcome(SaslCode::SysTemp),
        }
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // Neither mechanism has a challenge round.
        Self::outcome(SaslCode::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        Authenticator::new(&SaslConfig {
            allow_anonymous: false,
            users: vec![
                UserConfig { username: "app@t1".into(), password: "secret".into() },
                UserConfig { username: "ops@*".into(), password: "root".into() },
            ],
        })
    }

    const HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn tenant(verdict: Verdict) -> Option<String> {
        match verdict {
            Verdict::Accepted(identity) => identity.tenant,
            _ => None,
        }
    }

    #[test]
    fn plain_users() {
        let auth = authenticator();
        assert_eq!(tenant(auth.verify("app@t1", b"secret", HOST)).as_deref(), Some("t1"));
        assert_eq!(auth.verify("app@t1", b"wrong", HOST), Verdict::Denied);
        assert_eq!(auth.verify("app@t2", b"secret", HOST), Verdict::Denied);
        assert_eq!(tenant(auth.verify("ops@t9", b"root", HOST)).as_deref(), Some("t9"));
        assert_eq!(auth.verify("ops@*", b"root", HOST), Verdict::Denied);
        assert_eq!(auth.verify("nobody", b"x", HOST), Verdict::Denied);
    }

    #[test]
    fn failures_are_limited_per_source_and_cached_logins_pass() {
        let auth = authenticator();
        for i in 0..MAX_FAILURES_PER_SOURCE {
            assert_eq!(
                auth.verify("app@t1", format!("guess-{i}").as_bytes(), HOST),
                Verdict::Denied
            );
        }
        // The guessing source is now refused even with the right password...
        assert_eq!(auth.verify("app@t1", b"secret", HOST), Verdict::Throttled);
        // ... but the application elsewhere is not locked out by it,
        assert!(matches!(auth.verify("app@t1", b"secret", OTHER), Verdict::Accepted(_)));
        // and once it has logged in, its password (remembered as a MAC) passes anywhere.
        assert!(matches!(auth.verify("app@t1", b"secret", HOST), Verdict::Accepted(_)));
        // Other users from the guessing source are not affected.
        assert!(matches!(auth.verify("ops@t9", b"root", HOST), Verdict::Accepted(_)));
    }

    #[test]
    fn argon2_work_is_bounded() {
        let hash = {
            let params = argon2::Params::new(8, 1, 1, None).unwrap();
            let argon2 =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            argon2::password_hash::PasswordHasher::hash_password(&argon2, b"pw")
                .unwrap()
                .to_string()
        };
        let pool = HashPool::with_queue(1, 1);
        let auth = Authenticator::with_pool(
            &SaslConfig {
                allow_anonymous: false,
                users: vec![UserConfig { username: "app@t1".into(), password: hash }],
            },
            pool.clone(),
        );
        assert!(matches!(auth.verify("app@t1", b"pw", HOST), Verdict::Accepted(_)));
        // The shared pool's queue is full (a device login holds it): the verification is
        // refused at once, not queued, and the attempt is not held against the source.
        let (hold, release) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let pool = pool.clone();
            move || pool.run_blocking(|| release.recv().ok())
        });
        while pool.queued() == 0 {
            std::thread::yield_now();
        }
        assert_eq!(auth.verify("app@t1", b"other", OTHER), Verdict::Busy);
        hold.send(()).unwrap();
        assert_eq!(holder.join().unwrap(), Ok(Some(())));
        assert_eq!(auth.verify("app@t1", b"other-guess", OTHER), Verdict::Denied);
        // A repeated wrong password is refused without hashing again.
        assert_eq!(auth.verify("app@t1", b"other-guess", OTHER), Verdict::Throttled);
        // An unknown user is verified against a decoy hash, and denied.
        assert!(auth.decoy.is_some());
        assert_eq!(auth.verify("ghost@t1", b"pw", HOST), Verdict::Denied);
    }

    #[test]
    fn tenant_scope() {
        let id = Identity { user: "app@t1".into(), tenant: Some("t1".into()) };
        assert!(id.may_use("telemetry/t1"));
        assert!(id.may_use("command_response/t1/x"));
        assert!(!id.may_use("telemetry/t10"));
        assert!(!id.may_use("telemetry/t2"));
    }
}
