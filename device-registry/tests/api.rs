//! The management API over real sockets: status codes, headers and bodies as Hono's
//! Device Registry Management API v1 specifies them.

mod support;

use ferrule_device_registry::client::{ClientResponse, RegistryClient};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::TestRegistry;

/// Sends a request (no If-Match), asserts the answer's status and returns the answer.
async fn expect(
    c: &RegistryClient,
    method: Method,
    path: &str,
    body: Option<&Value>,
    status: StatusCode,
) -> ClientResponse {
    let r = c.request(method.clone(), path, body, None).await.unwrap();
    assert_eq!(r.status, status, "{method} {path}");
    r
}

#[tokio::test]
async fn operators_must_authenticate() {
    let reg = TestRegistry::embedded().await;
    let anon = reg.anonymous_client();
    let r = anon.request(Method::GET, "/v1/tenants", None, None).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.www_authenticate.as_deref().unwrap().contains("Bearer"));
    assert!(r.json()["error"].is_string());

    let wrong = ferrule_device_registry::client::RegistryClient::new(
        &reg.base_url(),
        Some("wrong-token-wrong-token".into()),
    )
    .unwrap();
    let r = wrong.request(Method::POST, "/v1/tenants/t1", Some(&json!({})), None).await.unwrap();
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // The OpenAPI document is public.
    let r = anon.request(Method::GET, "/v1/openapi.yaml", None, None).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&r.body).contains("openapi: 3.0.1"));
}

#[tokio::test]
async fn anonymous_access_only_when_configured() {
    let (store, _dir) = support::embedded_store();
    let config =
        ferrule_device_registry::RegistryConfig { allow_anonymous: true, ..support::test_config() };
    let reg = TestRegistry::with_store(store, config).await;
    let r =
        reg.anonymous_client().request(Method::POST, "/v1/tenants/anon", None, None).await.unwrap();
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn tenant_lifecycle_with_etags() {
    let (reg, c) = TestRegistry::embedded_with_client().await;
    let body = json!({"ext": {"a": 1}});
    let r = expect(&c, Method::POST, "/v1/tenants/t1", Some(&body), StatusCode::CREATED).await;
    assert_eq!(r.location.clone().unwrap(), format!("{}/v1/tenants/t1", reg.base_url()));
    assert_eq!(r.json(), json!({"id": "t1"}));
    let v1 = r.etag.unwrap();

    let r = expect(&c, Method::POST, "/v1/tenants/t1", None, StatusCode::CONFLICT).await;
    assert!(r.json()["error"].is_string());

    let r = expect(&c, Method::GET, "/v1/tenants/t1", None, StatusCode::OK).await;
    assert_eq!(r.etag.as_deref(), Some(v1.as_str()));
    assert_eq!(r.json(), json!({"enabled": true, "ext": {"a": 1}}));

    let r = c
        .request(Method::PUT, "/v1/tenants/t1", Some(&json!({"enabled": false})), Some("\"other\""))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = c
        .request(
            Method::PUT,
            "/v1/tenants/t1",
            Some(&json!({"enabled": false})),
            Some(&format!("\"{v1}\"")),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let v2 = r.etag.unwrap();
    assert_ne!(v1, v2);

    // Unknown properties and bad ids are 400, missing resources 404.
    let typo = json!({"enabeld": false});
    let r = expect(&c, Method::PUT, "/v1/tenants/t1", Some(&typo), StatusCode::BAD_REQUEST).await;
    assert!(r.json()["error"].as_str().unwrap().contains("enabeld"));
    expect(&c, Method::POST, "/v1/tenants/bad%2Fid", None, StatusCode::BAD_REQUEST).await;
    let r = expect(&c, Method::GET, "/v1/tenants/missing", None, StatusCode::NOT_FOUND).await;
    assert!(r.json()["error"].is_string());
    expect(&c, Method::PUT, "/v1/tenants/missing", Some(&json!({})), StatusCode::NOT_FOUND).await;
    // Updates need a body (creates do not).
    expect(&c, Method::PUT, "/v1/tenants/t1", None, StatusCode::BAD_REQUEST).await;
    // Accounting periods are `days` (with `no-of-days`) or `monthly`.
    for period in [json!({"mode": "weekly"}), json!({"mode": "days"})] {
        let limits = json!({"resource-limits": {"data-volume": {
            "effective-since": "2026-01-01T00:00:00Z", "max-bytes": 10, "period": period}}});
        let r =
            expect(&c, Method::PUT, "/v1/tenants/t1", Some(&limits), StatusCode::BAD_REQUEST).await;
        assert!(r.json()["error"].as_str().unwrap().contains("period mode"), "{period}");
    }

    // Generated id.
    let r = expect(&c, Method::POST, "/v1/tenants", None, StatusCode::CREATED).await;
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(r.location.clone().unwrap(), format!("{}/v1/tenants/{id}", reg.base_url()));

    for (if_match, status) in [
        (Some("\"stale\""), StatusCode::PRECONDITION_FAILED),
        (Some(v2.as_str()), StatusCode::NO_CONTENT),
        (None, StatusCode::NOT_FOUND),
    ] {
        let r = c.request(Method::DELETE, "/v1/tenants/t1", None, if_match).await.unwrap();
        assert_eq!(r.status, status, "DELETE with If-Match {if_match:?}");
    }

    expect(&c, Method::PATCH, "/v1/tenants/t1", None, StatusCode::METHOD_NOT_ALLOWED).await;
    expect(&c, Method::GET, "/v2/whatever", None, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn devices_search_and_credentials() {
    let (reg, c) = TestRegistry::embedded_with_client().await;
    expect(&c, Method::POST, "/v1/devices/nope/d1", None, StatusCode::NOT_FOUND).await;
    c.request(Method::POST, "/v1/tenants/t", None, None).await.unwrap().ok().unwrap();
    for (id, brand, n) in [("d1", "eclipse-a", 3), ("d2", "other", 1), ("d3", "eclipse-b", 2)] {
        let path = format!("/v1/devices/t/{id}");
        let body = json!({"ext": {"brand": brand, "n": n}});
        let r = expect(&c, Method::POST, &path, Some(&body), StatusCode::CREATED).await;
        assert_eq!(r.location.clone().unwrap(), format!("{}/v1/devices/t/{id}", reg.base_url()));
    }
    expect(&c, Method::POST, "/v1/devices/t/d1", None, StatusCode::CONFLICT).await;
    let gw = json!({"via": []});
    expect(&c, Method::POST, "/v1/devices/t/gw", Some(&gw), StatusCode::CREATED).await;
    let via_gw = json!({"via": ["gw"], "ext": {"brand": "other", "n": 1}});
    expect(&c, Method::PUT, "/v1/devices/t/d2", Some(&via_gw), StatusCode::NO_CONTENT).await;

    let r = expect(&c, Method::GET, "/v1/devices/t/d1", None, StatusCode::OK).await;
    assert!(r.etag.is_some());
    assert!(r.json()["status"]["created"].is_string());

    let filter = "%7B%22field%22%3A%22%2Fext%2Fbrand%22%2C%22value%22%3A%22eclipse*%22%7D";
    let sort = "%7B%22field%22%3A%22%2Fext%2Fn%22%2C%22direction%22%3A%22desc%22%7D";
    let path = format!("/v1/devices/t?filterJson={filter}&sortJson={sort}&pageSize=1");
    let j = expect(&c, Method::GET, &path, None, StatusCode::OK).await.json();
    assert_eq!(j["total"], 2);
    assert_eq!(j["result"][0]["id"], "d1");
    assert_eq!(j["result"].as_array().unwrap().len(), 1);
    let r = c.request(Method::GET, "/v1/devices/t?isGateway=true", None, None).await.unwrap();
    assert_eq!(r.json()["result"][0]["id"], "gw");
    expect(&c, Method::GET, "/v1/devices/t?pageSize=500", None, StatusCode::BAD_REQUEST).await;
    expect(&c, Method::GET, "/v1/devices/t?filterJson=%7B", None, StatusCode::BAD_REQUEST).await;
    // Hono answers an empty result with 404.
    expect(&c, Method::GET, "/v1/devices/t?pageOffset=100", None, StatusCode::NOT_FOUND).await;
    let r = c
        .request(
            Method::GET,
            "/v1/tenants?filterJson=%7B%22field%22%3A%22%2Fid%22%2C%22value%22%3A%22t%22%7D",
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.json(), json!({"total": 1, "result": [{"id": "t", "enabled": true}]}));

    // Credentials: empty set first, then patch-mode metadata on GET.
    let r = expect(&c, Method::GET, "/v1/credentials/t/d1", None, StatusCode::OK).await;
    assert_eq!(r.json(), json!([]));
    expect(&c, Method::GET, "/v1/credentials/t/none", None, StatusCode::NOT_FOUND).await;
    let creds =
        json!([{"type": "psk", "auth-id": "d1-psk", "secrets": [{"key": "c2VjcmV0LWtleQ=="}]}]);
    expect(&c, Method::PUT, "/v1/credentials/t/d1", Some(&creds), StatusCode::NO_CONTENT).await;
    let r = c.request(Method::GET, "/v1/credentials/t/d1", None, None).await.unwrap();
    let got = r.json();
    assert_eq!(got[0]["auth-id"], "d1-psk");
    assert!(got[0]["secrets"][0]["id"].is_string());
    assert!(got[0]["secrets"][0].get("key").is_none(), "key material must not be returned");
    // Same auth-id on another device: 409.
    expect(&c, Method::PUT, "/v1/credentials/t/d3", Some(&creds), StatusCode::CONFLICT).await;
    // Unknown secret id: 400; unsupported hash function: 400.
    for bad in [
        json!([{"type": "psk", "auth-id": "d1-psk", "secrets": [{"id": "nope"}]}]),
        json!([{"type": "hashed-password", "auth-id": "x", "secrets": [{"hash-function": "md5", "pwd-hash": "abc"}]}]),
    ] {
        expect(&c, Method::PUT, "/v1/credentials/t/d1", Some(&bad), StatusCode::BAD_REQUEST).await;
    }

    // Deleting all devices of a tenant.
    expect(&c, Method::DELETE, "/v1/devices/t", None, StatusCode::NO_CONTENT).await;
    expect(&c, Method::GET, "/v1/devices/t/d1", None, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn oversized_and_malformed_bodies() {
    let (_reg, c) = TestRegistry::embedded_with_client().await;
    let big = json!({"ext": {"blob": "x".repeat(100_000)}});
    expect(&c, Method::POST, "/v1/tenants/big", Some(&big), StatusCode::PAYLOAD_TOO_LARGE).await;
    // Not an object; an empty adapters list.
    for bad in [json!([1, 2]), json!({"adapters": []})] {
        expect(&c, Method::POST, "/v1/tenants/t", Some(&bad), StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn run_serves_until_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::test_config();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let data_dir = dir.path().to_owned();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { ferrule_device_registry::run(config, &data_dir, shutdown, Some(tx)).await }
    });
    let (addr, auth) = rx.await.expect("registry ready");
    let c = ferrule_device_registry::client::RegistryClient::new(
        &format!("http://{addr}"),
        Some(support::TOKEN.into()),
    )
    .unwrap();
    c.request(Method::POST, "/v1/tenants/t", None, None).await.unwrap().ok().unwrap();
    assert!(auth.get_tenant(&"t".parse().unwrap()).await.unwrap().is_some());
    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(10), task).await.unwrap().unwrap().unwrap();
    // The embedded store file lives in the data directory.
    assert!(dir.path().join("registry.redb").exists());
    assert!(
        c.request(Method::GET, "/v1/tenants/t", None, None).await.is_err(),
        "still serving after shutdown"
    );
}

#[tokio::test]
async fn registration_limits_are_enforced() {
    let (_reg, c) = TestRegistry::embedded_with_client().await;
    let limits =
        json!({"registration-limits": {"max-devices": 2, "max-credentials-per-device": 1}});
    expect(&c, Method::POST, "/v1/tenants/small", Some(&limits), StatusCode::CREATED).await;
    expect(&c, Method::POST, "/v1/tenants/big", None, StatusCode::CREATED).await;
    for d in ["d1", "d2"] {
        expect(&c, Method::POST, &format!("/v1/devices/small/{d}"), None, StatusCode::CREATED)
            .await;
    }
    let r = expect(&c, Method::POST, "/v1/devices/small/d3", None, StatusCode::FORBIDDEN).await;
    assert!(r.json()["error"].as_str().unwrap().contains("2 devices"), "{:?}", r.json());
    expect(&c, Method::POST, "/v1/devices/small", None, StatusCode::FORBIDDEN).await;
    expect(&c, Method::GET, "/v1/devices/small/d3", None, StatusCode::NOT_FOUND).await;
    // Another tenant has its own (no) limit.
    for d in ["d1", "d2", "d3"] {
        expect(&c, Method::POST, &format!("/v1/devices/big/{d}"), None, StatusCode::CREATED).await;
    }
    // A deleted device frees its place.
    expect(&c, Method::DELETE, "/v1/devices/small/d2", None, StatusCode::NO_CONTENT).await;
    expect(&c, Method::POST, "/v1/devices/small/d3", None, StatusCode::CREATED).await;

    let cred = |auth_id: &str| json!({"type": "hashed-password", "auth-id": auth_id, "secrets": [{"pwd-plain": "pw-123456"}]});
    let one = json!([cred("a1")]);
    expect(&c, Method::PUT, "/v1/credentials/small/d1", Some(&one), StatusCode::NO_CONTENT).await;
    let two = json!([cred("a1"), cred("a2")]);
    let r = expect(&c, Method::PUT, "/v1/credentials/small/d1", Some(&two), StatusCode::FORBIDDEN)
        .await;
    assert!(r.json()["error"].as_str().unwrap().contains("1 credentials"), "{:?}", r.json());
    expect(&c, Method::PUT, "/v1/credentials/big/d1", Some(&two), StatusCode::NO_CONTENT).await;

    // Limits change with the tenant.
    let raised = json!({"registration-limits": {"max-devices": 3}});
    expect(&c, Method::PUT, "/v1/tenants/small", Some(&raised), StatusCode::NO_CONTENT).await;
    expect(&c, Method::POST, "/v1/devices/small/d4", None, StatusCode::CREATED).await;
    expect(&c, Method::PUT, "/v1/credentials/small/d1", Some(&two), StatusCode::NO_CONTENT).await;
}
