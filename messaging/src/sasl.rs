//! SASL for applications: PLAIN (`name@tenant`) against configured users, and ANONYMOUS
//! only where configured. fe2o3-amqp's `SaslAcceptor` is synchronous and keeps the result
//! to itself, so each connection gets an acceptor holding a cell for the identity.

use std::sync::{Arc, OnceLock};

use argon2::password_hash::PasswordVerifier;
use fe2o3_amqp::acceptor::sasl_acceptor::{SaslAcceptor, SaslServerFrame};
use fe2o3_amqp_types::primitives::{Array, Symbol};
use fe2o3_amqp_types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};
use subtle::ConstantTimeEq;

use crate::config::{SaslConfig, UserConfig};

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

/// Checks application credentials.
#[derive(Debug)]
pub struct Authenticator {
    users: Vec<UserConfig>,
    allow_anonymous: bool,
}

impl Authenticator {
    pub fn new(config: &SaslConfig) -> Self {
        Self { users: config.users.clone(), allow_anonymous: config.allow_anonymous }
    }

    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
    }

    /// Verifies `user@tenant` / `password`.
    pub fn verify(&self, authcid: &str, password: &[u8]) -> Option<Identity> {
        let (name, tenant) = authcid.rsplit_once('@')?;
        if name.is_empty() || tenant.is_empty() || tenant == "*" {
            return None;
        }
        let wildcard = format!("{name}@*");
        let user = self.users.iter().find(|u| u.username == authcid || u.username == wildcard)?;
        if !password_matches(&user.password, password) {
            return None;
        }
        Some(Identity { user: authcid.to_owned(), tenant: Some(tenant.to_owned()) })
    }
}

fn password_matches(stored: &str, presented: &[u8]) -> bool {
    if stored.starts_with("$argon2") {
        let Ok(hash) = argon2::password_hash::phc::PasswordHash::new(stored) else {
            tracing::error!("an application user's password hash is not a valid PHC string");
            return false;
        };
        // argon2 is deliberately slow: keep it off the async worker's hot loop.
        let verify = || argon2::Argon2::default().verify_password(presented, &hash).is_ok();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(verify)
            }
            _ => verify(),
        }
    } else {
        stored.as_bytes().ct_eq(presented).into()
    }
}

/// The per-connection SASL acceptor.
#[derive(Clone)]
pub(crate) struct ConnectionSasl {
    pub(crate) authenticator: Arc<Authenticator>,
    pub(crate) identity: Arc<OnceLock<Identity>>,
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
        let identity = match init.mechanism.as_str() {
            PLAIN => init.initial_response.as_ref().and_then(|response| {
                let mut parts = response.as_ref().split(|b| *b == 0);
                let _authzid = parts.next()?;
                let authcid = std::str::from_utf8(parts.next()?).ok()?;
                let password = parts.next()?;
                let identity = self.authenticator.verify(authcid, password);
                if identity.is_none() {
                    tracing::info!(user = authcid, "application authentication failed");
                }
                identity
            }),
            ANONYMOUS if self.authenticator.allows_anonymous() => {
                Some(Identity { user: "anonymous".into(), tenant: None })
            }
            _ => None,
        };
        match identity {
            Some(identity) => {
                let _ = self.identity.set(identity);
                Self::outcome(SaslCode::Ok)
            }
            None => Self::outcome(SaslCode::Auth),
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

    #[test]
    fn plain_users() {
        let auth = authenticator();
        assert_eq!(auth.verify("app@t1", b"secret").unwrap().tenant.as_deref(), Some("t1"));
        assert!(auth.verify("app@t1", b"wrong").is_none());
        assert!(auth.verify("app@t2", b"secret").is_none());
        assert_eq!(auth.verify("ops@t9", b"root").unwrap().tenant.as_deref(), Some("t9"));
        assert!(auth.verify("ops@*", b"root").is_none());
        assert!(auth.verify("nobody", b"x").is_none());
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
