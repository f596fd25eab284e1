//! Look-ups adapters use for gateways and unauthenticated devices, with invalidation.

mod support;

use std::time::Duration;

use http::Method;
use serde_json::json;

use ferrule_device_registry::model::AdapterAccess;
use ferrule_device_registry::AuthError;
use support::{eventually, TestRegistry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_adapter_lookups() {
    let (reg, c) = TestRegistry::embedded_with_client().await;
    let tenant = json!({"adapters": [{"type": "hono-http", "enabled": true, "device-authentication-required": false},
                                      {"type": "hono-mqtt", "enabled": true}]});
    c.request(Method::POST, "/v1/tenants/t", Some(&tenant), None).await.unwrap().ok().unwrap();
    for (id, body) in [
        ("gw", json!({})),
        ("gw2", json!({})),
        ("gw3", json!({"memberOf": ["grp"]})),
        ("d", json!({"via": ["gw"]})),
        ("d2", json!({"viaGroups": ["grp"]})),
    ] {
        c.request(Method::POST, &format!("/v1/devices/t/{id}"), Some(&body), None)
            .await
            .unwrap()
            .ok()
            .unwrap();
    }
    let a = reg.registry.auth();
    assert_eq!(a.authorize_device("t", "d", None).await, Ok(()));
    assert_eq!(a.authorize_device("t", "d", Some("gw")).await, Ok(()));
    // Look-ups say what is wrong (authentication never does: it answers BadCredentials).
    assert_eq!(
        a.authorize_device("t", "d", Some("gw2")).await,
        Err(AuthError::GatewayNotAuthorized)
    );
    assert_eq!(a.authorize_device("t", "d2", Some("gw3")).await, Ok(()));
    assert_eq!(
        a.authorize_device("t", "d2", Some("gw")).await,
        Err(AuthError::GatewayNotAuthorized)
    );
    assert_eq!(a.authorize_device("t", "nope", None).await, Err(AuthError::UnknownDevice));
    assert_eq!(a.authorize_device("x", "d", None).await, Err(AuthError::UnknownTenant));
    let access = |enabled, unauthenticated| {
        Ok(AdapterAccess { enabled, unauthenticated, ..Default::default() })
    };
    assert_eq!(a.adapter_access("t", "hono-http").await, access(true, true));
    assert_eq!(a.adapter_access("t", "hono-mqtt").await, access(true, false));
    assert_eq!(a.adapter_access("t", "hono-coap").await, access(false, false));
    assert_eq!(a.adapter_access("x", "hono-http").await, access(false, false), "unknown");

    // Cached look-ups follow changes.
    c.request(Method::PUT, "/v1/devices/t/gw", Some(&json!({"enabled": false})), None)
        .await
        .unwrap()
        .ok()
        .unwrap();
    let took = eventually(Duration::from_secs(1), || async {
        a.authorize_device("t", "d", Some("gw")).await == Err(AuthError::GatewayNotAuthorized)
    })
    .await;
    assert!(took.is_some(), "disabled gateway still authorised after 1 s");
    c.request(Method::PUT, "/v1/tenants/t", Some(&json!({})), None).await.unwrap().ok().unwrap();
    let took = eventually(Duration::from_secs(1), || async {
        a.adapter_access("t", "hono-http").await.is_ok_and(|a| !a.unauthenticated)
    })
    .await;
    assert!(took.is_some(), "tenant change not seen by the look-up cache");
}
