//! A password set through the API verifies through the AuthService, is stored only as an
//! argon2id PHC string, and never appears in an API response, a log line, or the store file.
//! (One test in this binary: it installs the global tracing subscriber.)

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use http::{Method, StatusCode};
use serde_json::json;
use sha2::Digest;

use ferrule_device_registry::model::Credentials;
use ferrule_device_registry::{AuthError, CredentialType, DeviceId, TenantId};
use support::TestRegistry;

const PLAIN: &str = "Pl41n-Text-Passw0rd-xyzzy";
const PLAIN2: &str = "Second-Pl41n-Passw0rd-plugh";

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Buffer {
        self.clone()
    }
}

fn assert_clean(what: &str, bytes: &[u8]) {
    let s = String::from_utf8_lossy(bytes);
    assert!(!s.contains(PLAIN) && !s.contains(PLAIN2), "plaintext password leaked in {what}: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_is_hashed_verified_and_never_leaked() {
    let logs = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let reg = TestRegistry::embedded().await;
    let c = reg.client();
    let mut responses = Vec::new();
    let mut call = |r: ferrule_device_registry::client::ClientResponse| {
        responses.push(format!(
            "{:?} {:?} {}",
            r.etag,
            r.location,
            String::from_utf8_lossy(&r.body)
        ));
        r
    };

    call(c.request(Method::POST, "/v1/tenants/t", None, None).await.unwrap()).ok().unwrap();
    call(c.request(Method::POST, "/v1/devices/t/dev", None, None).await.unwrap()).ok().unwrap();
    let creds = json!([{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"pwd-plain": PLAIN}]}]);
    let r =
        call(c.request(Method::PUT, "/v1/credentials/t/dev", Some(&creds), None).await.unwrap());
    assert_eq!(r.status, StatusCode::NO_CONTENT);

    // Stored: only an argon2id PHC string.
    let store = reg.registry.management().store().clone();
    let (tenant, dev) = (TenantId::new("t").unwrap(), DeviceId::new("dev").unwrap());
    let stored = store.get_credentials(&tenant, &dev).await.unwrap().unwrap().value;
    let Credentials::HashedPassword(p) = &stored[0] else { panic!("wrong type") };
    let phc = p.secrets[0].pwd_hash.clone().unwrap();
    assert!(phc.starts_with("$argon2id$"), "stored hash is not argon2id PHC: {}", &phc[..10]);
    assert!(p.secrets[0].pwd_plain.is_none());
    assert_clean("stored record", serde_json::to_string(&stored).unwrap().as_bytes());

    // Verifies through the auth service; a wrong password does not.
    let auth = reg.registry.auth().clone();
    let who = auth
        .authenticate("t", CredentialType::HashedPassword, "sensor", PLAIN.as_bytes())
        .await
        .unwrap();
    assert_eq!(who.device.as_str(), "dev");
    assert_eq!(
        auth.authenticate("t", CredentialType::HashedPassword, "sensor", b"wrong").await,
        Err(AuthError::BadCredentials)
    );
    assert_eq!(
        auth.authenticate("other", CredentialType::HashedPassword, "sensor", PLAIN.as_bytes())
            .await,
        Err(AuthError::BadCredentials)
    );
    // Second success comes from the cache.
    assert!(auth.cached_verifications() >= 1);
    auth.authenticate("t", CredentialType::HashedPassword, "sensor", PLAIN.as_bytes())
        .await
        .unwrap();

    // GET returns metadata only.
    let r = call(c.request(Method::GET, "/v1/credentials/t/dev", None, None).await.unwrap());
    let got = r.json();
    let secret = &got[0]["secrets"][0];
    let id = secret["id"].as_str().unwrap().to_owned();
    for k in ["pwd-hash", "pwd-plain", "salt", "hash-function"] {
        assert!(secret.get(k).is_none(), "{k} returned");
    }
    assert!(!String::from_utf8_lossy(&r.body).contains("argon2"));

    // Patch mode: only the id keeps the stored hash.
    let keep = json!([{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"id": id, "comment": "kept"}]}]);
    let r = call(c.request(Method::PUT, "/v1/credentials/t/dev", Some(&keep), None).await.unwrap());
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let stored = store.get_credentials(&tenant, &dev).await.unwrap().unwrap().value;
    let Credentials::HashedPassword(p) = &stored[0] else { panic!() };
    assert_eq!(p.secrets[0].pwd_hash.as_deref(), Some(phc.as_str()));
    assert_eq!(p.secrets[0].meta.comment.as_deref(), Some("kept"));
    auth.authenticate("t", CredentialType::HashedPassword, "sensor", PLAIN.as_bytes())
        .await
        .unwrap();

    // Same id with a new pwd-plain replaces the password.
    let change = json!([{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"id": id, "pwd-plain": PLAIN2}]}]);
    let r =
        call(c.request(Method::PUT, "/v1/credentials/t/dev", Some(&change), None).await.unwrap());
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    auth.authenticate("t", CredentialType::HashedPassword, "sensor", PLAIN2.as_bytes())
        .await
        .unwrap();

    // A malformed request carrying the password in a wrong-typed field: 400 without echo.
    let bad = json!([{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"enabled": PLAIN, "pwd-plain": PLAIN}]}]);
    let r = call(c.request(Method::PUT, "/v1/credentials/t/dev", Some(&bad), None).await.unwrap());
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let bad = json!([{"type": "hashed-password", "auth-id": "sensor", "secrets": [{"pwd-plain": [PLAIN]}]}]);
    let r = call(c.request(Method::PUT, "/v1/credentials/t/dev", Some(&bad), None).await.unwrap());
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Imported Hono hashes verify: bcrypt and salted sha-512.
    let bcrypt_hash = bcrypt::hash("imported-bcrypt", 4).unwrap();
    let salt = b"NaCl";
    let mut h = sha2::Sha512::new();
    h.update(salt);
    h.update(b"imported-sha");
    let b64 = base64::engine::general_purpose::STANDARD;
    let imported = json!([
        {"type": "hashed-password", "auth-id": "bc", "secrets": [{"hash-function": "bcrypt", "pwd-hash": bcrypt_hash}]},
        {"type": "hashed-password", "auth-id": "sh", "secrets": [{"hash-function": "sha-512", "pwd-hash": b64.encode(h.finalize()), "salt": b64.encode(salt)}]}
    ]);
    call(c.request(Method::PUT, "/v1/credentials/t/dev", Some(&imported), None).await.unwrap())
        .ok()
        .unwrap();
    auth.authenticate("t", CredentialType::HashedPassword, "bc", b"imported-bcrypt").await.unwrap();
    auth.authenticate("t", CredentialType::HashedPassword, "sh", b"imported-sha").await.unwrap();
    assert_eq!(
        auth.authenticate("t", CredentialType::HashedPassword, "sh", b"imported-bcrypt").await,
        Err(AuthError::BadCredentials)
    );

    for (i, r) in responses.iter().enumerate() {
        assert_clean(&format!("API response #{i}"), r.as_bytes());
    }
    let log = logs.0.lock().unwrap().clone();
    assert!(
        String::from_utf8_lossy(&log).contains("management request"),
        "the log capture saw nothing"
    );
    assert_clean("log output", &log);

    // Nor in the store file on disk.
    drop(store);
    let file = std::fs::read(reg.data_path().join("registry.redb")).unwrap();
    assert_clean("embedded store file", &file);
}
