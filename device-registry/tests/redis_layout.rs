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
