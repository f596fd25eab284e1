//! Benchmark of device authentication through `AuthService` on the embedded store
//! (not a test; no assertions on timing). Run:
//!
//! ```sh
//! cargo bench -p ferrule-device-registry --bench auth
//! ```
//!
//! One current-thread runtime and a hash pool of 1: every figure is for one core.
//! - warm: the same device reconnects with the same password (cache hit: HMAC + map);
//! - cold: the cache is cleared before each attempt (store look-ups + one argon2id verify);
//! - cold sha-512: the same with an imported Hono sha-512 hash;
//! - warm, many devices: 10,000 devices round-robin, all cached.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use ferrule_device_registry::auth::AuthSettings;
use ferrule_device_registry::model::{PasswordCredentials, PasswordSecret, SecretMeta};
use ferrule_device_registry::{
    AuthService, CredentialType, Credentials, Device, DeviceId, EmbeddedStore, HashPool,
    Management, RegistryStore, Tenant, TenantId,
};

fn secret(plain: Option<&str>, function: Option<&str>, hash: Option<String>) -> PasswordSecret {
    PasswordSecret {
        meta: SecretMeta::default(),
        hash_function: function.map(str::to_owned),
        pwd_hash: hash,
        salt: None,
        pwd_plain: plain.map(str::to_owned),
    }
}

/// A `hashed-password` entry for `auth_id` with one secret.
fn entry(auth_id: impl Into<String>, secret: PasswordSecret) -> Credentials {
    Credentials::HashedPassword(PasswordCredentials {
        auth_id: auth_id.into(),
        enabled: true,
        ext: None,
        secrets: vec![secret],
    })
}

/// Runs `auth_once` `n` times and prints the rate.
async fn timed<F: Future>(name: &str, n: u64, mut auth_once: impl FnMut() -> F) {
    let start = Instant::now();
    for _ in 0..n {
        auth_once().await;
    }
    let took = start.elapsed();
    let per_s = n as f64 / took.as_secs_f64();
    let us = took.as_secs_f64() * 1e6 / n as f64;
    println!(
        "{name:<34} {n:>8} auths in {:>7.3} s  {per_s:>12.0} /s/core  {us:>10.2} µs each",
        took.as_secs_f64()
    );
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn RegistryStore> =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.redb")).unwrap());
    let mgmt = Management::new(store.clone(), HashPool::new(1));
    let auth = AuthService::new(store.clone(), HashPool::new(1), AuthSettings::default());
    let t = TenantId::new("bench").unwrap();
    store.create_tenant(&t, &Tenant::default()).await.unwrap();
    let dev = DeviceId::new("dev").unwrap();
    mgmt.create_device(&t, Some(dev.clone()), Device::default()).await.unwrap();
    use base64::Engine;
    use sha2::Digest;
    let sha =
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(b"sha-password"));
    let creds = vec![
        entry("argon", secret(Some("argon-password"), None, None)),
        entry("sha", secret(None, Some("sha-512"), Some(sha))),
    ];
    mgmt.set_credentials(&t, &dev, creds, None).await.unwrap();

    let a = |id: &'static str, pw: &'static [u8]| {
        let auth = auth.clone();
        async move { auth.authenticate("bench", CredentialType::HashedPassword, id, pw).await.unwrap() }
    };

    // Warm: one device, cached.
    a("argon", b"argon-password").await;
    timed("warm (cache hit)", 500_000, || a("argon", b"argon-password")).await;

    // Cold: argon2id every time.
    timed("cold argon2id (store + verify)", 40, || {
        auth.clear();
        a("argon", b"argon-password")
    })
    .await;

    timed("cold sha-512 (store + verify)", 20_000, || {
        auth.clear();
        a("sha", b"sha-password")
    })
    .await;

    // Warm with many devices: cache hit path with a large map.
    let many = 10_000;
    let mut batch = Vec::new();
    for i in 0..many {
        let d = DeviceId::new(format!("d{i}")).unwrap();
        store.create_device(&t, &d, &Device::default()).await.unwrap();
        batch.push(d);
    }
    let sha1 = base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(b"pw"));
    for (i, d) in batch.iter().enumerate() {
        let c = [entry(format!("a{i}"), secret(None, Some("sha-512"), Some(sha1.clone())))];
        store.set_credentials(&t, d, &c, None).await.unwrap();
    }
    let ids: Vec<String> = (0..many).map(|i| format!("a{i}")).collect();
    for id in &ids {
        auth.authenticate("bench", CredentialType::HashedPassword, id, b"pw").await.unwrap();
    }
    let rounds = 50;
    let mut round_robin = ids.iter().cycle();
    timed("warm, 10k devices round-robin", rounds * many as u64, || {
        let (auth, id) = (&auth, round_robin.next().expect("ids is not empty"));
        async move {
            auth.authenticate("bench", CredentialType::HashedPassword, id, b"pw").await.unwrap()
        }
    })
    .await;
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(run());
}
