//! Disabling a device or changing its password makes the next authentication fail within
//! 1 s, on the instance that made the change and on a second instance sharing Redis.

mod support;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::json;

use ferrule_device_registry::auth::AuthSettings;
use ferrule_device_registry::client::RegistryClient;
use ferrule_device_registry::{AuthError, AuthService, CredentialType, HashPool, RegistryStore};
use support::{eventually, TestRegistry};

const LIMIT: Duration = Duration::from_secs(1);

/// PUTs `body` to `path`; the request must succeed.
async fn put(c: &RegistryClient, path: &str, body: serde_json::Value) {
    c.request(Method::PUT, path, Some(&body), None).await.unwrap().ok().unwrap();
}

async fn provision(c: &RegistryClient) {
    c.request(Method::POST, "/v1/tenants/t", None, None).await.unwrap().ok().unwrap();
    c.request(Method::POST, "/v1/devices/t/dev", None, None).await.unwrap().ok().unwrap();
    let creds = json!([{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"pwd-plain": "first-password"}]}]);
    put(c, "/v1/credentials/t/dev", creds).await;
}

/// Provisions `reg` and waits until its auth service has seen the provisioning changes
/// (registry changes reset failure counts).
async fn provisioned(reg: &TestRegistry) -> AuthService {
    provision(&reg.client()).await;
    let a = reg.registry.auth().clone();
    assert!(eventually(LIMIT, || async { a.change_seq() >= 3 }).await.is_some());
    a
}

/// Asserts that `check` holds for every observer within [`LIMIT`]; `failure` says what
/// it means if not.
async fn all_notice<F, Fut>(observers: &[AuthService], failure: &str, check: F)
where
    F: Fn(AuthService) -> Fut,
    Fut: Future<Output = bool>,
{
    for (i, a) in observers.iter().enumerate() {
        let took = eventually(LIMIT, || check(a.clone())).await;
        assert!(took.is_some(), "instance {i}: {failure}");
    }
}

async fn auth(a: &AuthService, pw: &str) -> Result<(), AuthError> {
    a.authenticate("t", CredentialType::HashedPassword, "sensor", pw.as_bytes()).await.map(|_| ())
}

/// Runs the scenario: `c` changes the registry, `observers` must all notice within 1 s.
async fn scenario(c: &RegistryClient, observers: &[AuthService]) {
    provision(c).await;
    for a in observers {
        // Warm the caches.
        assert_eq!(auth(a, "first-password").await, Ok(()));
        assert_eq!(auth(a, "first-password").await, Ok(()));
    }

    put(c, "/v1/devices/t/dev", json!({"enabled": false})).await;
    all_notice(observers, "disabled device still authenticated after 1 s", |a| async move {
        auth(&a, "first-password").await == Err(AuthError::DeviceDisabled)
    })
    .await;

    put(c, "/v1/devices/t/dev", json!({"enabled": true})).await;
    all_notice(observers, "re-enabled device not accepted within 1 s", |a| async move {
        auth(&a, "first-password").await.is_ok()
    })
    .await;

    let secret_id =
        c.request(Method::GET, "/v1/credentials/t/dev", None, None).await.unwrap().json()[0]
            ["secrets"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
    let change = json!([{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"id": secret_id, "pwd-plain": "second-password"}]}]);
    put(c, "/v1/credentials/t/dev", change).await;
    all_notice(observers, "old password still accepted after 1 s", |a| async move {
        auth(&a, "first-password").await.is_err()
    })
    .await;
    for (i, a) in observers.iter().enumerate() {
        assert_eq!(auth(a, "second-password").await, Ok(()), "instance {i}: new password refused");
    }

    // Tenant-level change reaches cached look-ups too.
    put(c, "/v1/tenants/t", json!({"enabled": false})).await;
    all_notice(observers, "disabled tenant still authenticated after 1 s", |a| async move {
        auth(&a, "second-password").await == Err(AuthError::TenantDisabled)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_changes_cut_off_promptly() {
    let reg = TestRegistry::embedded().await;
    scenario(&reg.client(), &[reg.registry.auth().clone()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_changes_reach_a_second_instance() {
    let redis = support::RedisServer::start().await;
    let reg = TestRegistry::with_store(redis.store().await, support::test_config()).await;
    // A second registry instance: its own store connection, its own AuthService and cache.
    let second_store: Arc<dyn RegistryStore> = redis.store().await;
    let second = AuthService::new(second_store, HashPool::new(1), AuthSettings::default());
    scenario(&reg.client(), &[reg.registry.auth().clone(), second]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_are_rate_limited() {
    let reg = TestRegistry::embedded().await;
    let a = &provisioned(&reg).await;
    for i in 0..5 {
        assert_eq!(auth(a, &format!("wrong-{i}")).await, Err(AuthError::BadCredentials));
    }
    assert_eq!(auth(a, "first-password").await, Err(AuthError::RateLimited));
    let psk = json!([{"type": "psk", "auth-id": "p1", "secrets": [{"key": "a2V5LWJ5dGVz"}]}]);
    put(&reg.client(), "/v1/credentials/t/dev", psk).await;
    let key = eventually(LIMIT, || async { a.psk_for("t", "p1").await.is_ok() }).await;
    assert!(key.is_some());
    assert_eq!(a.psk_for("t", "p1").await.unwrap().key, b"key-bytes");
    assert!(!format!("{:?}", a.psk_for("t", "p1").await.unwrap()).contains("key-bytes"));
    assert!(a.authenticate("t", CredentialType::Psk, "p1", b"key-bytes").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_starts_on_redis_from_config() {
    let redis = support::RedisServer::start().await;
    let config = ferrule_device_registry::RegistryConfig {
        storage: ferrule_device_registry::StorageKind::Redis,
        redis_url: redis.url(),
        ..support::test_config()
    };
    let dir = tempfile::tempdir().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let reg =
        ferrule_device_registry::Registry::start(&config, dir.path(), shutdown).await.unwrap();
    let c =
        RegistryClient::new(&format!("http://{}", reg.local_addr()), Some(support::TOKEN.into()))
            .unwrap();
    provision(&c).await;
    assert_eq!(auth(reg.auth(), "first-password").await, Ok(()));
    // Nothing was written to the data directory: the data lives in Redis.
    assert!(!dir.path().join("registry.redb").exists());
    let other =
        ferrule_device_registry::RedisStore::connect(&redis.url(), &config.redis_key_prefix)
            .await
            .unwrap();
    assert!(other.get_tenant(&"t".parse().unwrap()).await.unwrap().is_some());
    reg.stop().await;
}

/// Security review M3: failures were counted only after a hash finished, so 500
/// simultaneous guesses all got hashed. Attempts now count when they start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guesses_count_when_they_start() {
    let reg = TestRegistry::embedded().await;
    let a = provisioned(&reg).await;
    let guesses: Vec<_> = (0..50)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { auth(&a, &format!("guess-{i}")).await })
        })
        .collect();
    let mut checked = 0;
    for guess in guesses {
        match guess.await.unwrap() {
            Err(AuthError::BadCredentials) => checked += 1,
            Err(AuthError::RateLimited) => {}
            other => panic!("a guess got {other:?}"),
        }
    }
    assert!(checked <= 5, "{checked} guesses were verified; at most max_failures (5) may be");
    assert_eq!(auth(&a, "first-password").await, Err(AuthError::RateLimited));
}

/// A source guessing an auth-id's password locks out only itself: the device, from its
/// own address, still gets in (issue 11: a lockout must not be usable against the
/// legitimate device).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessing_source_locks_out_only_itself() {
    let reg = TestRegistry::embedded().await;
    let a = provisioned(&reg).await;
    let attacker: std::net::IpAddr = "198.51.100.7".parse().unwrap();
    let device: std::net::IpAddr = "203.0.113.9".parse().unwrap();
    let from = |source, pw: String| {
        let a = a.clone();
        async move {
            a.authenticate_from(
                "t",
                CredentialType::HashedPassword,
                "sensor",
                pw.as_bytes(),
                Some(source),
            )
            .await
            .map(|_| ())
        }
    };
    for i in 0..5 {
        assert_eq!(from(attacker, format!("guess-{i}")).await, Err(AuthError::BadCredentials));
    }
    assert_eq!(from(attacker, "first-password".into()).await, Err(AuthError::RateLimited));
    assert_eq!(
        from(device, "first-password".into()).await,
        Ok(()),
        "the device's own address is not locked out"
    );
}
