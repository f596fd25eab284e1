//! The Redis store on a real 3-master Redis Cluster (redis-server 7, started by the test on
//! free loopback ports): management CRUD through the HTTP API with tenants spread over the
//! masters, change invalidation between two instances, trusted-CA subject uniqueness, and
//! the store over TLS (one server and a cluster).
//! Skips (saying why) only if `redis-server` or `redis-cli` is not installed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ferrule_device_registry::auth::AuthSettings;
use ferrule_device_registry::client::RegistryClient;
use ferrule_device_registry::{
    AuthError, AuthService, CredentialType, HashPool, RedisStore, RedisTls, RegistryStore,
};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::cluster::{binaries_missing, node_cmd, RedisCluster, PREFIX};
use support::tls::TlsFiles;
use support::{eventually, TestRegistry};

const LIMIT: Duration = Duration::from_secs(1);

/// A started cluster, or `None` (after printing why) if the binaries are missing.
async fn cluster() -> Option<RedisCluster> {
    if let Some(why) = binaries_missing() {
        eprintln!("skipping the Redis Cluster test: {why}");
        return None;
    }
    Some(RedisCluster::start().await)
}

/// Sends a request, asserts the status and returns the response.
async fn send(
    c: &RegistryClient,
    method: Method,
    path: &str,
    body: Option<Value>,
    if_match: Option<&str>,
    status: StatusCode,
) -> ferrule_device_registry::client::ClientResponse {
    let r = c.request(method.clone(), path, body.as_ref(), if_match).await.unwrap();
    assert_eq!(r.status, status, "{method} {path}: {}", String::from_utf8_lossy(&r.body));
    r
}

fn password(auth_id: &str, pw: &str) -> Value {
    json!([{"type": "hashed-password", "auth-id": auth_id, "secrets": [{"pwd-plain": pw}]}])
}

/// Creates tenant `t` with a device and its password, then checks reads, conditional
/// updates and a device delete.
async fn tenant_crud(c: &RegistryClient, t: &str) {
    send(c, Method::POST, &format!("/v1/tenants/{t}"), None, None, StatusCode::CREATED).await;
    send(c, Method::POST, &format!("/v1/tenants/{t}"), None, None, StatusCode::CONFLICT).await;
    for d in ["dev-1", "dev-2"] {
        let path = format!("/v1/devices/{t}/{d}");
        send(c, Method::POST, &path, None, None, StatusCode::CREATED).await;
    }
    let creds = format!("/v1/credentials/{t}/dev-1");
    let body = Some(password(&format!("{t}-sensor"), "pw-0123456789"));
    send(c, Method::PUT, &creds, body, None, StatusCode::NO_CONTENT).await;

    let dev = format!("/v1/devices/{t}/dev-1");
    let etag = send(c, Method::GET, &dev, None, None, StatusCode::OK).await.etag.unwrap();
    let off = Some(json!({"enabled": false}));
    send(c, Method::PUT, &dev, off.clone(), Some("\"stale\""), StatusCode::PRECONDITION_FAILED)
        .await;
    send(c, Method::PUT, &dev, off, Some(&etag), StatusCode::NO_CONTENT).await;
    let got = send(c, Method::GET, &dev, None, None, StatusCode::OK).await.json();
    assert_eq!(got["enabled"], false);
    let on = Some(json!({"enabled": true}));
    send(c, Method::PUT, &dev, on, None, StatusCode::NO_CONTENT).await;

    let gone = format!("/v1/devices/{t}/dev-2");
    send(c, Method::DELETE, &gone, None, None, StatusCode::NO_CONTENT).await;
    send(c, Method::GET, &gone, None, None, StatusCode::NOT_FOUND).await;
}

/// Which node holds each tenant's keys; panics if one tenant's keys are on several.
async fn tenant_nodes(cluster: &RedisCluster) -> BTreeMap<String, u16> {
    let mut at: BTreeMap<String, u16> = BTreeMap::new();
    for &port in &cluster.ports {
        for key in cluster.keys_on(port).await {
            // `P:{tenant}:kind`; the global keys have no tag.
            let Some(rest) = key.strip_prefix(&format!("{PREFIX}:{{")) else { continue };
            let Some((tenant, _kind)) = rest.split_once("}:") else { continue };
            if let Some(other) = at.insert(tenant.to_owned(), port) {
                assert_eq!(other, port, "keys of tenant {tenant} on two nodes");
            }
        }
    }
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_through_the_api_spreads_tenants_over_the_masters() {
    let Some(cluster) = cluster().await else { return };
    // Every request is a new connection: lift the per-source rate limit above ~100 of them.
    let config = ferrule_device_registry::RegistryConfig {
        connection_rate_per_ip: 1000.0,
        connection_burst_per_ip: 1000,
        ..support::test_config()
    };
    let reg = TestRegistry::with_store(cluster.store().await, config).await;
    let c = reg.client();
    let tenants: Vec<String> = (0..6).map(|i| format!("tenant-{i}")).collect();
    for t in &tenants {
        tenant_crud(&c, t).await;
    }
    let listed = send(&c, Method::GET, "/v1/tenants", None, None, StatusCode::OK).await.json();
    assert_eq!(listed["total"], 6, "{listed}");
    let a = reg.registry.auth();
    let ok = a.authenticate(
        "tenant-3",
        CredentialType::HashedPassword,
        "tenant-3-sensor",
        b"pw-0123456789",
    );
    assert!(ok.await.is_ok());

    // One tenant's keys share a slot; the tenants use more than one master.
    let port = cluster.ports[0];
    let slot = |k: String| async move {
        node_cmd::<i64>(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(k)).await
    };
    let t = slot(format!("{PREFIX}:{{tenant-0}}:t")).await;
    assert_eq!(slot(format!("{PREFIX}:{{tenant-0}}:i")).await, t);
    let nodes = tenant_nodes(&cluster).await;
    assert_eq!(nodes.len(), tenants.len(), "{nodes:?}");
    let used: BTreeSet<u16> = nodes.values().copied().collect();
    assert!(used.len() >= 2, "all tenants on one master: {nodes:?}");

    // Deleting a tenant takes its devices and credentials along, on whichever master.
    let t5 = "/v1/tenants/tenant-5";
    send(&c, Method::DELETE, t5, None, Some("\"stale\""), StatusCode::PRECONDITION_FAILED).await;
    send(&c, Method::DELETE, t5, None, None, StatusCode::NO_CONTENT).await;
    send(&c, Method::GET, t5, None, None, StatusCode::NOT_FOUND).await;
    send(&c, Method::GET, "/v1/devices/tenant-5/dev-1", None, None, StatusCode::NOT_FOUND).await;
    assert!(!tenant_nodes(&cluster).await.contains_key("tenant-5"));
    let listed = send(&c, Method::GET, "/v1/tenants", None, None, StatusCode::OK).await.json();
    assert_eq!(listed["total"], 5, "{listed}");
    // Re-created, it starts empty.
    send(&c, Method::POST, t5, None, None, StatusCode::CREATED).await;
    send(&c, Method::GET, "/v1/devices/tenant-5/dev-1", None, None, StatusCode::NOT_FOUND).await;
}

async fn auth(a: &AuthService, pw: &str) -> Result<(), AuthError> {
    a.authenticate("t", CredentialType::HashedPassword, "sensor", pw.as_bytes()).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_disabled_on_one_instance_is_refused_by_another_within_1s() {
    let Some(cluster) = cluster().await else { return };
    let reg = TestRegistry::with_store(cluster.store().await, support::test_config()).await;
    // A second instance: its own cluster connection, pub/sub, AuthService and cache.
    let second_store: Arc<dyn RegistryStore> = cluster.store().await;
    let second = AuthService::new(second_store, HashPool::new(1), AuthSettings::default());
    let observers = [reg.registry.auth().clone(), second];

    let c = reg.client();
    send(&c, Method::POST, "/v1/tenants/t", None, None, StatusCode::CREATED).await;
    send(&c, Method::POST, "/v1/devices/t/dev", None, None, StatusCode::CREATED).await;
    let body = Some(password("sensor", "first-password"));
    send(&c, Method::PUT, "/v1/credentials/t/dev", body, None, StatusCode::NO_CONTENT).await;
    for a in &observers {
        // Warm the caches.
        assert_eq!(auth(a, "first-password").await, Ok(()));
        assert_eq!(auth(a, "first-password").await, Ok(()));
    }

    let off = Some(json!({"enabled": false}));
    send(&c, Method::PUT, "/v1/devices/t/dev", off, None, StatusCode::NO_CONTENT).await;
    for (i, a) in observers.iter().enumerate() {
        let refused =
            || async { auth(a, "first-password").await == Err(AuthError::DeviceDisabled) };
        let took = eventually(LIMIT, refused).await;
        assert!(took.is_some(), "instance {i}: disabled device still authenticated after 1 s");
    }
}

/// A self-signed CA certificate `CN={cn},O=Acme` with a fresh key, as a `trusted-ca` entry.
fn trusted_ca(cn: &str) -> Value {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Acme");
    params.distinguished_name.push(DnType::CommonName, cn);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    json!({"cert": base64::engine::general_purpose::STANDARD.encode(der)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_ca_subject_stays_with_one_tenant() {
    let Some(cluster) = cluster().await else { return };
    let a = TestRegistry::with_store(cluster.store().await, support::test_config()).await;
    let b = TestRegistry::with_store(cluster.store().await, support::test_config()).await;
    let (ca, cb) = (a.client(), b.client());
    // A guard left held by an instance that died long ago is taken over, not waited for.
    let mut conn = redis::cluster::ClusterClient::new(cluster.urls())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let guard = format!("{PREFIX}:ca-guard");
    let held = redis::cmd("HSET").arg(&guard).arg("gen").arg("5").arg("since").arg("0").clone();
    let _: () = held.query_async(&mut conn).await.unwrap();
    let root = Some(json!({"trusted-ca": [trusted_ca("Root")]}));
    send(&ca, Method::POST, "/v1/tenants/owner", root, None, StatusCode::CREATED).await;
    let gen: String =
        redis::cmd("HGET").arg(&guard).arg("gen").query_async(&mut conn).await.unwrap();
    assert_eq!(gen, "8", "taken over at 6, begun at 7, ended at 8");

    // Same subject DN, another key, through the other instance: refused on create and update.
    let copy = Some(json!({"trusted-ca": [trusted_ca("Root")]}));
    let r = send(&cb, Method::POST, "/v1/tenants/thief", copy.clone(), None, StatusCode::CONFLICT)
        .await;
    assert_eq!(r.json()["subject-dn"], "CN=Root,O=Acme");
    send(&cb, Method::POST, "/v1/tenants/other", None, None, StatusCode::CREATED).await;
    send(&cb, Method::PUT, "/v1/tenants/other", copy.clone(), None, StatusCode::CONFLICT).await;
    // Once the owner is gone, the subject is free again.
    send(&ca, Method::DELETE, "/v1/tenants/owner", None, None, StatusCode::NO_CONTENT).await;
    send(&cb, Method::PUT, "/v1/tenants/other", copy, None, StatusCode::NO_CONTENT).await;

    // Concurrent creates naming one subject, through both instances: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        let body = json!({"trusted-ca": [trusted_ca("Racer")]});
        tasks.push(tokio::spawn(async move {
            let path = format!("/v1/tenants/racer{i}");
            c.request(Method::POST, &path, Some(&body), None).await.unwrap().status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let created = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    assert_eq!(created, 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| [StatusCode::CREATED, StatusCode::CONFLICT].contains(s)));
}

/// TLS to Redis (`rediss://`, a private CA given as `redis_tls_ca_file` would give it):
/// the store works through the management API over one TLS server and over a 3-master
/// cluster whose clients and bus use TLS; without the CA (the system's roots) the server's
/// certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reaches_redis_over_tls_and_verifies_the_server() {
    if let Some(why) = binaries_missing() {
        eprintln!("skipping the Redis TLS test: {why}");
        return;
    }
    let files = TlsFiles::new();
    let trust = RedisTls::from_ca_file(Some(&files.ca())).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let tls_port = support::candidate_port(false);
    let args = files.server_args(tls_port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut server, _) = support::spawn_redis(dir.path(), &args, false).await;
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let store = RedisStore::connect_tls(&url, PREFIX, &trust).await.expect("TLS with the CA");
    let registry = TestRegistry::with_store(Arc::new(store), support::test_config()).await;
    tenant_crud(&registry.client(), "tls-single").await;
    let untrusted =
        tokio::time::timeout(Duration::from_secs(30), RedisStore::connect(&url, PREFIX)).await;
    let refused = untrusted.expect("a refused certificate fails, it does not hang").err();
    assert!(refused.is_some(), "the system's roots do not trust the private CA");
    let _ = server.kill();
    let _ = server.wait();

    let cluster = RedisCluster::start_with(Some(&files)).await;
    let store = RedisStore::connect_cluster_tls(&cluster.tls_urls(), PREFIX, &trust)
        .await
        .expect("TLS to the cluster with the CA");
    let registry = TestRegistry::with_store(Arc::new(store), support::test_config()).await;
    tenant_crud(&registry.client(), "tls-cluster").await;
    let mut keys = 0;
    for &port in &cluster.ports {
        keys += cluster.keys_on(port).await.len();
    }
    assert!(keys > 0, "the tenant's keys were written to the cluster");
}
