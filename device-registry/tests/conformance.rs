//! One storage conformance suite, run against the embedded store and against a real
//! redis-server started by the test.

mod support;

use std::sync::Arc;
use std::time::Duration;

use ferrule_device_registry::model::{
    PasswordCredentials, PasswordSecret, PskCredentials, PskSecret, SecretMeta,
};
use ferrule_device_registry::{
    Change, CredentialType, Credentials, Device, DeviceId, RegistryStore, StoreError, Tenant,
    TenantId,
};

fn t(s: &str) -> TenantId {
    TenantId::new(s).unwrap()
}
fn d(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn pw(auth_id: &str) -> Credentials {
    Credentials::HashedPassword(PasswordCredentials {
        auth_id: auth_id.into(),
        enabled: true,
        ext: None,
        secrets: vec![PasswordSecret {
            meta: SecretMeta { id: Some("s1".into()), ..Default::default() },
            hash_function: Some("sha-256".into()),
            pwd_hash: Some("n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=".into()),
            salt: None,
            pwd_plain: None,
        }],
    })
}

fn psk(auth_id: &str) -> Credentials {
    Credentials::Psk(PskCredentials {
        auth_id: auth_id.into(),
        enabled: true,
        ext: None,
        secrets: vec![PskSecret { meta: SecretMeta::default(), key: Some("c2VjcmV0".into()) }],
    })
}

async fn suite(store: Arc<dyn RegistryStore>) {
    tenants(&*store).await;
    devices(&*store).await;
    credentials(&*store).await;
    cascades(&*store).await;
    changes(&*store).await;
}

async fn tenants(s: &dyn RegistryStore) {
    let id = t("tenant-a");
    let v1 = s.create_tenant(&id, &Tenant::default()).await.unwrap();
    assert!(matches!(
        s.create_tenant(&id, &Tenant::default()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let got = s.get_tenant(&id).await.unwrap().unwrap();
    assert_eq!(got.version, v1);
    assert!(got.value.enabled);
    assert!(s.get_tenant(&t("nope")).await.unwrap().is_none());

    let disabled = Tenant { enabled: false, ..Tenant::default() };
    assert!(matches!(
        s.update_tenant(&id, &disabled, Some("wrong")).await,
        Err(StoreError::VersionMismatch)
    ));
    let v2 = s.update_tenant(&id, &disabled, Some(&format!("\"{v1}\""))).await.unwrap();
    assert_ne!(v1, v2);
    assert!(!s.get_tenant(&id).await.unwrap().unwrap().value.enabled);
    // Unconditional update.
    let v3 = s.update_tenant(&id, &Tenant::default(), None).await.unwrap();
    assert!(matches!(
        s.update_tenant(&t("nope"), &Tenant::default(), None).await,
        Err(StoreError::NotFound(_))
    ));

    s.create_tenant(&t("tenant-b"), &Tenant::default()).await.unwrap();
    let ids: Vec<String> =
        s.list_tenants().await.unwrap().into_iter().map(|(i, _)| i.to_string()).collect();
    assert_eq!(ids, vec!["tenant-a", "tenant-b"]);

    assert!(matches!(s.delete_tenant(&id, Some(&v1)).await, Err(StoreError::VersionMismatch)));
    s.delete_tenant(&id, Some(&v3)).await.unwrap();
    assert!(s.get_tenant(&id).await.unwrap().is_none());
    assert!(matches!(s.delete_tenant(&id, None).await, Err(StoreError::NotFound(_))));
}

async fn devices(s: &dyn RegistryStore) {
    let ten = t("tenant-d");
    assert!(matches!(
        s.create_device(&ten, &d("dev-1"), &Device::default()).await,
        Err(StoreError::NotFound("tenant"))
    ));
    s.create_tenant(&ten, &Tenant::default()).await.unwrap();
    let v1 = s.create_device(&ten, &d("dev-2"), &Device::default()).await.unwrap();
    s.create_device(&ten, &d("dev-1"), &Device::default()).await.unwrap();
    assert!(matches!(
        s.create_device(&ten, &d("dev-1"), &Device::default()).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let got = s.get_device(&ten, &d("dev-2")).await.unwrap().unwrap();
    assert_eq!(got.version, v1);
    assert!(s.get_device(&ten, &d("other")).await.unwrap().is_none());

    let gw = Device { via: Some(vec!["gw".into()]), ..Device::default() };
    assert!(matches!(
        s.update_device(&ten, &d("dev-2"), &gw, Some("x")).await,
        Err(StoreError::VersionMismatch)
    ));
    let v2 = s.update_device(&ten, &d("dev-2"), &gw, Some(&v1)).await.unwrap();
    assert_eq!(
        s.get_device(&ten, &d("dev-2")).await.unwrap().unwrap().value.via,
        Some(vec!["gw".to_string()])
    );
    assert!(matches!(
        s.update_device(&ten, &d("zz"), &gw, None).await,
        Err(StoreError::NotFound(_))
    ));

    let ids: Vec<String> =
        s.list_devices(&ten).await.unwrap().into_iter().map(|(i, _)| i.to_string()).collect();
    assert_eq!(ids, vec!["dev-1", "dev-2"]);
    // A new device has an empty credentials set.
    let creds = s.get_credentials(&ten, &d("dev-1")).await.unwrap().unwrap();
    assert!(creds.value.is_empty());
    assert!(s.get_credentials(&ten, &d("zz")).await.unwrap().is_none());

    assert!(matches!(
        s.delete_device(&ten, &d("dev-2"), Some(&v1)).await,
        Err(StoreError::VersionMismatch)
    ));
    s.delete_device(&ten, &d("dev-2"), Some(&v2)).await.unwrap();
    assert!(s.get_device(&ten, &d("dev-2")).await.unwrap().is_none());
    assert!(matches!(s.delete_device(&ten, &d("dev-2"), None).await, Err(StoreError::NotFound(_))));
}

async fn credentials(s: &dyn RegistryStore) {
    let ten = t("tenant-c");
    s.create_tenant(&ten, &Tenant::default()).await.unwrap();
    s.create_device(&ten, &d("d1"), &Device::default()).await.unwrap();
    s.create_device(&ten, &d("d2"), &Device::default()).await.unwrap();
    let v0 = s.get_credentials(&ten, &d("d1")).await.unwrap().unwrap().version;

    assert!(matches!(
        s.set_credentials(&ten, &d("d1"), &[pw("a")], Some("bad")).await,
        Err(StoreError::VersionMismatch)
    ));
    let v1 = s.set_credentials(&ten, &d("d1"), &[pw("a"), psk("a")], Some(&v0)).await.unwrap();
    let (dev, c) =
        s.find_credentials(&ten, CredentialType::HashedPassword, "a").await.unwrap().unwrap();
    assert_eq!(dev, d("d1"));
    assert_eq!(c, pw("a"));
    assert!(s.find_credentials(&ten, CredentialType::Psk, "a").await.unwrap().is_some());
    assert!(s.find_credentials(&ten, CredentialType::HashedPassword, "b").await.unwrap().is_none());
    assert!(s
        .find_credentials(&t("tenant-d"), CredentialType::HashedPassword, "a")
        .await
        .unwrap()
        .is_none());

    // The same (type, auth-id) on another device of the tenant conflicts.
    assert!(matches!(
        s.set_credentials(&ten, &d("d2"), &[pw("a")], None).await,
        Err(StoreError::Conflict(_))
    ));
    // Duplicates within one set conflict.
    assert!(matches!(
        s.set_credentials(&ten, &d("d2"), &[pw("x"), pw("x")], None).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.set_credentials(&ten, &d("nope"), &[pw("z")], None).await,
        Err(StoreError::NotFound(_))
    ));

    // Replacing the set drops the old auth-ids from the index.
    let v2 = s.set_credentials(&ten, &d("d1"), &[pw("b")], Some(&v1)).await.unwrap();
    assert_ne!(v1, v2);
    assert!(s.find_credentials(&ten, CredentialType::HashedPassword, "a").await.unwrap().is_none());
    assert!(s.find_credentials(&ten, CredentialType::Psk, "a").await.unwrap().is_none());
    assert_eq!(
        s.find_credentials(&ten, CredentialType::HashedPassword, "b").await.unwrap().unwrap().0,
        d("d1")
    );
    // ... so another device may take "a" now.
    s.set_credentials(&ten, &d("d2"), &[pw("a")], None).await.unwrap();

    // Deleting a device frees its auth-ids.
    s.delete_device(&ten, &d("d1"), None).await.unwrap();
    assert!(s.find_credentials(&ten, CredentialType::HashedPassword, "b").await.unwrap().is_none());
    assert!(s.get_credentials(&ten, &d("d1")).await.unwrap().is_none());
}

async fn cascades(s: &dyn RegistryStore) {
    let ten = t("tenant-x");
    s.create_tenant(&ten, &Tenant::default()).await.unwrap();
    s.create_device(&ten, &d("d1"), &Device::default()).await.unwrap();
    s.set_credentials(&ten, &d("d1"), &[pw("a")], None).await.unwrap();
    s.delete_devices_of_tenant(&ten).await.unwrap();
    assert!(s.list_devices(&ten).await.unwrap().is_empty());
    assert!(s.find_credentials(&ten, CredentialType::HashedPassword, "a").await.unwrap().is_none());
    assert!(s.get_tenant(&ten).await.unwrap().is_some());
    assert!(matches!(s.delete_devices_of_tenant(&t("nope")).await, Err(StoreError::NotFound(_))));

    s.create_device(&ten, &d("d1"), &Device::default()).await.unwrap();
    s.set_credentials(&ten, &d("d1"), &[pw("a")], None).await.unwrap();
    s.delete_tenant(&ten, None).await.unwrap();
    s.create_tenant(&ten, &Tenant::default()).await.unwrap();
    assert!(s.get_device(&ten, &d("d1")).await.unwrap().is_none());
    assert!(s.find_credentials(&ten, CredentialType::HashedPassword, "a").await.unwrap().is_none());
}

async fn changes(s: &dyn RegistryStore) {
    let mut rx = s.subscribe();
    let ten = t("tenant-ch");
    s.create_tenant(&ten, &Tenant::default()).await.unwrap();
    s.create_device(&ten, &d("d1"), &Device::default()).await.unwrap();
    let want = [Change::Tenant(ten.clone()), Change::Device(ten.clone(), d("d1"))];
    let mut seen = Vec::new();
    // The Redis store announces locally and again via pub/sub, plus `All` on (re)subscribe.
    while !want.iter().all(|w| seen.contains(w)) {
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Ok(c)) => seen.push(c),
            other => panic!("changes not announced (saw {seen:?}): {other:?}"),
        }
    }
}

#[tokio::test]
async fn embedded_store_conformance() {
    let (store, _dir) = support::embedded_store();
    suite(store).await;
}

#[tokio::test]
async fn embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.redb");
    {
        let s = ferrule_device_registry::EmbeddedStore::open(&path).unwrap();
        s.create_tenant(&t("keep"), &Tenant::default()).await.unwrap();
    }
    let s = ferrule_device_registry::EmbeddedStore::open(&path).unwrap();
    assert!(s.get_tenant(&t("keep")).await.unwrap().is_some());
}

#[tokio::test]
async fn redis_store_conformance() {
    let redis = support::RedisServer::start().await;
    suite(redis.store().await).await;
}
