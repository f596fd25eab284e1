//! A single-server Redis store written by a version before the hash-tag key layout is
//! moved to the new layout at connect (`P:t:T` -> `P:{T}:t` and so on), once.

mod support;

use ferrule_device_registry::{DeviceId, RedisStore, RegistryStore, TenantId};
use support::RedisServer;

#[tokio::test]
async fn old_layout_keys_are_moved_at_connect() {
    let redis = RedisServer::start().await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let p = "ferrule:old";
    let tenant = r#"{"version":"v1","value":{"enabled":true}}"#;
    let device = r#"{"version":"v2","value":{"enabled":false}}"#;
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(format!("{p}:t:old-tenant"))
        .arg(tenant)
        .ignore()
        .cmd("HSET")
        .arg(format!("{p}:d:old-tenant"))
        .arg("dev")
        .arg(device)
        .ignore()
        .cmd("SADD")
        .arg(format!("{p}:tenants"))
        .arg("old-tenant")
        .ignore()
        .cmd("SET")
        .arg(format!("{p}:ca-gen"))
        .arg("7")
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();

    let store = RedisStore::connect(&redis.url(), p).await.unwrap();
    let t = TenantId::new("old-tenant").unwrap();
    assert_eq!(store.get_tenant(&t).await.unwrap().unwrap().version, "v1");
    let d = store.get_device(&t, &DeviceId::new("dev").unwrap()).await.unwrap().unwrap();
    assert!(!d.value.enabled);
    assert_eq!(store.list_tenants().await.unwrap().len(), 1);
    let left: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    assert!(!left.iter().any(|k| k.contains(":t:") || k.ends_with(":ca-gen")), "{left:?}");

    // Marked done: keys written in the old layout later are not looked for again.
    let _: () = redis::cmd("SET")
        .arg(format!("{p}:t:late"))
        .arg(tenant)
        .query_async(&mut conn)
        .await
        .unwrap();
    let again = RedisStore::connect(&redis.url(), p).await.unwrap();
    assert!(again.get_tenant(&TenantId::new("late").unwrap()).await.unwrap().is_none());
}

/// The shared password verifiers (`P:{T}:v`) go with the credentials they were made for:
/// replacing a device's credentials drops its hashed-password auth-ids' entries (not those
/// of other devices), deleting the device or all devices of the tenant drops the rest.
#[tokio::test]
async fn shared_verifiers_go_with_their_credentials() {
    use http::{Method, StatusCode};
    use serde_json::json;

    let redis = RedisServer::start().await;
    let p = "ferrule:test";
    let store: std::sync::Arc<dyn RegistryStore> =
        std::sync::Arc::new(RedisStore::connect(&redis.url(), p).await.unwrap());
    let registry = support::TestRegistry::with_store(store.clone(), support::test_config()).await;
    let c = registry.client();
    let call = |method: Method, path: String, body: Option<serde_json::Value>, status| {
        let c = c.clone();
        async move {
            let r = c.request(method.clone(), &path, body.as_ref(), None).await.unwrap();
            assert_eq!(r.status, status, "{method} {path}: {}", String::from_utf8_lossy(&r.body));
        }
    };
    let password = |auth_id: &str| json!([{"type": "hashed-password", "auth-id": auth_id, "secrets": [{"pwd-plain": "pw-0123456789"}]}]);
    call(Method::POST, "/v1/tenants/tv".into(), None, StatusCode::CREATED).await;
    for d in ["d1", "d2", "d3"] {
        call(Method::POST, format!("/v1/devices/tv/{d}"), None, StatusCode::CREATED).await;
        let creds = Some(password(&format!("{d}-user")));
        call(Method::PUT, format!("/v1/credentials/tv/{d}"), creds, StatusCode::NO_CONTENT).await;
    }
    let t = TenantId::new("tv").unwrap();
    let verifiers = || async {
        let mut kept = Vec::new();
        for a in ["d1-user", "d2-user", "d3-user"] {
            if store.get_verifier(&t, a).await.unwrap().is_some() {
                kept.push(a);
            }
        }
        kept
    };
    for a in ["d1-user", "d2-user", "d3-user"] {
        store.put_verifier(&t, a, b"key-id-and-mac").await.unwrap();
    }
    let d1_new = Some(password("d1-other"));
    call(Method::PUT, "/v1/credentials/tv/d1".into(), d1_new, StatusCode::NO_CONTENT).await;
    assert_eq!(verifiers().await, ["d2-user", "d3-user"], "d1's old auth-id's verifier went");
    call(Method::DELETE, "/v1/devices/tv/d2".into(), None, StatusCode::NO_CONTENT).await;
    assert_eq!(verifiers().await, ["d3-user"], "d2's verifier went with the device");
    store.delete_devices_of_tenant(&t).await.unwrap();
    assert!(verifiers().await.is_empty(), "none left after all devices went");
}
