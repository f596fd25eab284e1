//! X.509 rules of the registry (issue 17): a trusted CA's subject DN belongs to one tenant
//! (409 on the management API, both stores, also under concurrent writes), OCSP is refused
//! until implemented (400), and only client certificates authenticate devices.

mod support;

use std::sync::Arc;

use base64::Engine;
use ferrule_device_registry::client::RegistryClient;
use ferrule_device_registry::{AuthError, RegistryStore};
use http::{Method, StatusCode};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose as Eku,
    IsCa, KeyPair, KeyUsagePurpose as Ku,
};
use serde_json::{json, Value};
use support::{RedisServer, TestRegistry};

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A self-signed CA `CN={cn},O=Acme` with a fresh key.
fn ca(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Acme");
    params.distinguished_name.push(DnType::CommonName, cn);
    Ca { cert: params.self_signed(&key).unwrap(), key }
}

/// The DER subject Name of `ca`'s certificate.
fn subject_der(ca: &Ca) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(ca.cert.der()).unwrap();
    cert.subject().as_raw().to_vec()
}

fn b64(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// A `trusted-ca` entry given by certificate.
fn by_cert(ca: &Ca) -> Value {
    json!({"cert": b64(ca.cert.der())})
}

/// Sends a request, asserts the status and returns the JSON body (`null` if none).
async fn send(
    c: &RegistryClient,
    method: Method,
    path: &str,
    body: Option<&Value>,
    status: StatusCode,
) -> Value {
    let r = c.request(method.clone(), path, body, None).await.unwrap();
    assert_eq!(r.status, status, "{method} {path}: {}", String::from_utf8_lossy(&r.body));
    if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

/// Asserts a 409 body in Hono's error format for the subject DN `dn` (as the request
/// wrote it).
fn assert_ca_conflict_for(body: &Value, dn: &str) {
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("already used by another tenant"), "{error}");
    assert!(error.contains(dn), "{error}");
    assert_eq!(body["subject-dn"], dn);
}

/// [`assert_ca_conflict_for`] the subject `CN=Root,O=Acme`.
fn assert_ca_conflict(body: &Value) {
    assert_ca_conflict_for(body, "CN=Root,O=Acme");
}

/// The subject-uniqueness rules, run against the registry `c` talks to.
async fn trusted_ca_subject_unique(c: &RegistryClient) {
    let root = ca("Root");
    // Same subject DN, other key: what anyone can build from a public CA certificate.
    let copy = ca("Root");
    let other = ca("Other");

    send(
        c,
        Method::POST,
        "/v1/tenants/owner",
        Some(&json!({"trusted-ca": [by_cert(&root)]})),
        StatusCode::CREATED,
    )
    .await;

    // Create: by certificate (identical or another key), by subject DN written otherwise.
    let key = b64(&copy.key.public_key_der());
    for (entry, dn) in [
        (by_cert(&root), "CN=Root,O=Acme"),
        (by_cert(&copy), "CN=Root,O=Acme"),
        (json!({"subject-dn": "cn=Root, o=Acme", "public-key": &key}), "cn=Root, o=Acme"),
        (
            json!({"subject-dn-bytes": b64(&subject_der(&root)), "public-key": &key}),
            "CN=Root,O=Acme",
        ),
    ] {
        let body = json!({"trusted-ca": [by_cert(&other), entry]});
        let r =
            send(c, Method::POST, "/v1/tenants/intruder", Some(&body), StatusCode::CONFLICT).await;
        assert_ca_conflict_for(&r, dn);
    }
    send(c, Method::GET, "/v1/tenants/intruder", None, StatusCode::NOT_FOUND).await;

    // A trust-anchor-group does not allow sharing either (no way to name the tenant).
    let grouped = json!({"trust-anchor-group": "g", "trusted-ca": [by_cert(&copy)]});
    send(
        c,
        Method::PUT,
        "/v1/tenants/owner",
        Some(&json!({"trust-anchor-group": "g", "trusted-ca": [by_cert(&root)]})),
        StatusCode::NO_CONTENT,
    )
    .await;
    let r =
        send(c, Method::POST, "/v1/tenants/intruder", Some(&grouped), StatusCode::CONFLICT).await;
    assert_ca_conflict(&r);

    // Update: a tenant without the CA may not add it, and keeps what it had.
    send(
        c,
        Method::POST,
        "/v1/tenants/intruder",
        Some(&json!({"trusted-ca": [by_cert(&other)]})),
        StatusCode::CREATED,
    )
    .await;
    let body = json!({"trusted-ca": [by_cert(&other), by_cert(&copy)]});
    let r = send(c, Method::PUT, "/v1/tenants/intruder", Some(&body), StatusCode::CONFLICT).await;
    assert_ca_conflict(&r);
    let stored = send(c, Method::GET, "/v1/tenants/intruder", None, StatusCode::OK).await;
    assert_eq!(stored["trusted-ca"].as_array().unwrap().len(), 1);
    assert_eq!(stored["trusted-ca"][0]["cert"], b64(other.cert.der()));
    // ... nor may a new tenant take the subject the intruder holds.
    let r = send(
        c,
        Method::POST,
        "/v1/tenants/third",
        Some(&json!({"trusted-ca": [by_cert(&other)]})),
        StatusCode::CONFLICT,
    )
    .await;
    assert_eq!(r["subject-dn"], "CN=Other,O=Acme");

    // The owner may update its own CA list: keep it, add a second key for the same subject
    // (roll-over), change other properties.
    let body = json!({"enabled": true, "trusted-ca": [by_cert(&root), by_cert(&copy)]});
    send(c, Method::PUT, "/v1/tenants/owner", Some(&body), StatusCode::NO_CONTENT).await;
    send(
        c,
        Method::PUT,
        "/v1/tenants/owner",
        Some(&json!({"ext": {"x": 1}, "trusted-ca": [by_cert(&root)]})),
        StatusCode::NO_CONTENT,
    )
    .await;

    // Once the owner drops the CA (or is deleted), another tenant may take it.
    send(c, Method::PUT, "/v1/tenants/owner", Some(&json!({})), StatusCode::NO_CONTENT).await;
    let body = json!({"trusted-ca": [by_cert(&other), by_cert(&copy)]});
    send(c, Method::PUT, "/v1/tenants/intruder", Some(&body), StatusCode::NO_CONTENT).await;
    send(c, Method::DELETE, "/v1/tenants/intruder", None, StatusCode::NO_CONTENT).await;
    send(
        c,
        Method::POST,
        "/v1/tenants/third",
        Some(&json!({"trusted-ca": [by_cert(&root)]})),
        StatusCode::CREATED,
    )
    .await;

    // An update of a missing tenant stays 404, whatever its CAs.
    send(
        c,
        Method::PUT,
        "/v1/tenants/missing",
        Some(&json!({"trusted-ca": [by_cert(&root)]})),
        StatusCode::NOT_FOUND,
    )
    .await;
}

/// Answers to `n` concurrent requests, made through `clients` in turn.
async fn race(
    clients: &[RegistryClient],
    n: usize,
    request: impl Fn(usize) -> (Method, String, Value),
) -> Vec<StatusCode> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = clients[i % clients.len()].clone();
        let (method, path, body) = request(i);
        tasks.push(tokio::spawn(async move {
            c.request(method, &path, Some(&body), None).await.unwrap().status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// `n` concurrent creates of tenants that all name one CA subject (each with its own key):
/// exactly one wins, the others get 409; the same for `n` concurrent updates.
async fn concurrent_writes_one_wins(clients: &[RegistryClient], n: usize) {
    let statuses = race(clients, n, |i| {
        let body = json!({"trusted-ca": [by_cert(&ca("Root"))]});
        (Method::POST, format!("/v1/tenants/racer{i}"), body)
    })
    .await;
    let created = statuses.iter().filter(|s| **s == StatusCode::CREATED).count();
    assert_eq!(created, 1, "creates: {statuses:?}");
    assert!(statuses.iter().all(|s| [StatusCode::CREATED, StatusCode::CONFLICT].contains(s)));

    for i in 0..n {
        send(
            &clients[0],
            Method::POST,
            &format!("/v1/tenants/updater{i}"),
            None,
            StatusCode::CREATED,
        )
        .await;
    }
    let statuses = race(clients, n, |i| {
        let body = json!({"trusted-ca": [by_cert(&ca("Shared"))]});
        (Method::PUT, format!("/v1/tenants/updater{i}"), body)
    })
    .await;
    let updated = statuses.iter().filter(|s| **s == StatusCode::NO_CONTENT).count();
    assert_eq!(updated, 1, "updates: {statuses:?}");
    assert!(statuses.iter().all(|s| [StatusCode::NO_CONTENT, StatusCode::CONFLICT].contains(s)));
}

#[tokio::test]
async fn trusted_ca_subject_unique_across_tenants_embedded() {
    let (_reg, c) = TestRegistry::embedded_with_client().await;
    trusted_ca_subject_unique(&c).await;
}

#[tokio::test]
async fn trusted_ca_subject_unique_across_tenants_redis() {
    let redis = RedisServer::start().await;
    let reg = TestRegistry::with_store(redis.store().await, support::test_config()).await;
    trusted_ca_subject_unique(&reg.client()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tenant_writes_cannot_share_a_ca_embedded() {
    let (_reg, c) = TestRegistry::embedded_with_client().await;
    concurrent_writes_one_wins(&[c], 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tenant_writes_cannot_share_a_ca_redis() {
    let redis = RedisServer::start().await;
    // Two registry instances on one Redis, as in a multi-instance deployment.
    let a = TestRegistry::with_store(redis.store().await, support::test_config()).await;
    let b = TestRegistry::with_store(redis.store().await, support::test_config()).await;
    concurrent_writes_one_wins(&[a.client(), b.client()], 8).await;
}

#[tokio::test]
async fn ocsp_revocation_is_refused_until_implemented() {
    let (_reg, c) = TestRegistry::embedded_with_client().await;
    let root = ca("Root");
    let ocsp =
        json!({"trusted-ca": [{"cert": b64(root.cert.der()), "ocsp-revocation-enabled": true}]});
    let r = send(&c, Method::POST, "/v1/tenants/t", Some(&ocsp), StatusCode::BAD_REQUEST).await;
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("OCSP revocation checking is not implemented"), "{error}");
    send(&c, Method::GET, "/v1/tenants/t", None, StatusCode::NOT_FOUND).await;

    let off =
        json!({"trusted-ca": [{"cert": b64(root.cert.der()), "ocsp-revocation-enabled": false}]});
    send(&c, Method::POST, "/v1/tenants/t", Some(&off), StatusCode::CREATED).await;
    let r = send(&c, Method::PUT, "/v1/tenants/t", Some(&ocsp), StatusCode::BAD_REQUEST).await;
    assert!(r["error"].as_str().unwrap().contains("OCSP"));
    let stored = send(&c, Method::GET, "/v1/tenants/t", None, StatusCode::OK).await;
    assert!(stored["trusted-ca"][0].get("ocsp-revocation-enabled").is_none(), "{stored}");

    // A trusted CA whose certificate does not parse trusts nothing: refused as well.
    let garbage = json!({"trusted-ca": [{"cert": b64(b"not a certificate")}]});
    let r = send(&c, Method::PUT, "/v1/tenants/t", Some(&garbage), StatusCode::BAD_REQUEST).await;
    assert!(r["error"].as_str().unwrap().contains("not a DER X.509 certificate"));
}

/// A device certificate `CN={cn},O=Acme` issued by `issuer`, with the given profile.
fn device_cert(issuer: &Ca, cn: &str, is_ca: IsCa, ku: Vec<Ku>, eku: Vec<Eku>) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![format!("{cn}.example")]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Acme");
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = is_ca;
    params.key_usages = ku;
    params.extended_key_usages = eku;
    params.signed_by(&key, &issuer.cert, &issuer.key).unwrap().der().to_vec()
}

/// Registers device `id` in `tenant` with an `x509-cert` credential for subject `CN={id},O=Acme`.
async fn register_device(c: &RegistryClient, tenant: &str, id: &str) {
    send(c, Method::POST, &format!("/v1/devices/{tenant}/{id}"), None, StatusCode::CREATED).await;
    let creds = json!([{"type": "x509-cert", "auth-id": format!("CN={id},O=Acme")}]);
    send(
        c,
        Method::PUT,
        &format!("/v1/credentials/{tenant}/{id}"),
        Some(&creds),
        StatusCode::NO_CONTENT,
    )
    .await;
}

#[tokio::test]
async fn only_client_certificates_authenticate_devices() {
    let (reg, c) = TestRegistry::embedded_with_client().await;
    let root = ca("Root");
    send(
        &c,
        Method::POST,
        "/v1/tenants/t",
        Some(&json!({"trusted-ca": [by_cert(&root)]})),
        StatusCode::CREATED,
    )
    .await;
    // Every certificate below has a registered subject and is signed by the tenant's CA:
    // only its profile decides.
    for id in ["client", "plain", "sub-ca", "no-ds", "server-only"] {
        register_device(&c, "t", id).await;
    }
    let auth = reg.registry.auth();

    let client = device_cert(
        &root,
        "client",
        IsCa::ExplicitNoCa,
        vec![Ku::DigitalSignature],
        vec![Eku::ClientAuth],
    );
    let device = auth.authenticate_certificate(&client).await.expect("a client certificate");
    assert_eq!((device.tenant.as_str(), device.device.as_str()), ("t", "client"));
    let plain = device_cert(&root, "plain", IsCa::NoCa, vec![], vec![]);
    auth.authenticate_certificate(&plain).await.expect("no usage extensions restrict nothing");

    let refused = [
        (
            "CA certificate",
            device_cert(
                &root,
                "sub-ca",
                IsCa::Ca(BasicConstraints::Unconstrained),
                vec![Ku::DigitalSignature, Ku::KeyCertSign],
                vec![Eku::ClientAuth],
            ),
        ),
        (
            "KeyUsage without digitalSignature",
            device_cert(
                &root,
                "no-ds",
                IsCa::NoCa,
                vec![Ku::KeyEncipherment],
                vec![Eku::ClientAuth],
            ),
        ),
        (
            "ExtendedKeyUsage serverAuth only",
            device_cert(
                &root,
                "server-only",
                IsCa::NoCa,
                vec![Ku::DigitalSignature],
                vec![Eku::ServerAuth],
            ),
        ),
    ];
    for (what, der) in refused {
        assert_eq!(
            auth.authenticate_certificate(&der).await,
            Err(AuthError::BadCredentials),
            "{what}"
        );
    }
    // The tenant's own root CA certificate is no device either (were it registered as one).
    register_device(&c, "t", "Root").await;
    assert_eq!(
        auth.authenticate_certificate(root.cert.der()).await,
        Err(AuthError::BadCredentials),
        "the root CA itself"
    );
    // The good one still passes after the refusals (no lock-out).
    auth.authenticate_certificate(&client).await.expect("still accepted");
}

/// Tenants stored with a shared CA subject before the rule (written to Redis directly, as
/// an older version would have): the issuer no longer picks one of them.
#[tokio::test]
async fn a_ca_subject_shared_in_stored_data_authenticates_nobody() {
    let redis = RedisServer::start().await;
    let store: Arc<dyn RegistryStore> = redis.store().await;
    let reg = TestRegistry::with_store(store, support::test_config()).await;
    let c = reg.client();
    let root = ca("Root");
    // "b-owner" holds the CA and the device; "a-squatter" sorts first.
    send(
        &c,
        Method::POST,
        "/v1/tenants/b-owner",
        Some(&json!({"trusted-ca": [by_cert(&root)]})),
        StatusCode::CREATED,
    )
    .await;
    send(&c, Method::POST, "/v1/tenants/a-squatter", None, StatusCode::CREATED).await;
    register_device(&c, "b-owner", "dev").await;
    register_device(&c, "a-squatter", "dev").await;
    let cert =
        device_cert(&root, "dev", IsCa::NoCa, vec![Ku::DigitalSignature], vec![Eku::ClientAuth]);
    let auth = reg.registry.auth();
    let device = auth.authenticate_certificate(&cert).await.expect("the owner's device");
    assert_eq!(device.tenant.as_str(), "b-owner");

    // Bypass the API: what an older version let the squatter store.
    let mut conn =
        redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let record =
        json!({"version": "legacy", "value": {"enabled": true, "trusted-ca": [by_cert(&root)]}});
    let _: () = redis::cmd("SET")
        .arg("ferrule:test:{a-squatter}:t")
        .arg(record.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("PUBLISH")
        .arg("ferrule:test:changes")
        .arg("T\ta-squatter")
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = support::eventually(std::time::Duration::from_secs(5), || async {
        auth.authenticate_certificate(&cert).await == Err(AuthError::BadCredentials)
    })
    .await;
    assert!(refused.is_some(), "an issuer trusted by two tenants must authenticate nobody");
    // Writes through the API now see the shared subject: the squatter cannot keep it.
    let r = send(
        &c,
        Method::PUT,
        "/v1/tenants/a-squatter",
        Some(&json!({"trusted-ca": [by_cert(&root)]})),
        StatusCode::CONFLICT,
    )
    .await;
    assert_ca_conflict(&r);
    send(&c, Method::PUT, "/v1/tenants/a-squatter", Some(&json!({})), StatusCode::NO_CONTENT).await;
    let back = support::eventually(std::time::Duration::from_secs(5), || async {
        auth.authenticate_certificate(&cert).await.is_ok_and(|d| d.tenant.as_str() == "b-owner")
    })
    .await;
    assert!(back.is_some(), "with the subject in one tenant again, its device authenticates");
}
