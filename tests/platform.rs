//! The whole platform in one process ([`ferrule::Platform`]): provisioned through the
//! management operations, a device uploads over a real HTTP socket, an application
//! consumes over a real AMQP connection; shutdown stops every tier and flushes the store,
//! so an event accepted before it is delivered after a restart on the same data directory.

use std::net::SocketAddr;
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use ferrule::config::Config;
use ferrule::Platform;
use ferrule_device_registry::{DeviceId, TenantId};
use ferrule_messaging::UserConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(data_dir: &std::path::Path) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = Config { data_dir: data_dir.to_owned(), ..Config::default() };
    config.ops.listen = any;
    config.registry.listen = any;
    config.registry.allow_anonymous = true;
    config.messaging.listen = any;
    config.messaging.sasl.users =
        vec![UserConfig { username: "app@t1".into(), password: "app-secret".into() }];
    config.adapters.http.listen = any;
    config.adapters.mqtt.listen = any;
    config.adapters.coap.listen_dtls = any;
    config
}

async fn provision(platform: &Platform) {
    let management = platform.management();
    let tenant = TenantId::new("t1").unwrap();
    let tenant_body = serde_json::from_value(serde_json::json!({})).unwrap();
    management.create_tenant(Some(tenant.clone()), tenant_body).await.unwrap();
    let device = DeviceId::new("d1").unwrap();
    let device_body = serde_json::from_value(serde_json::json!({})).unwrap();
    management.create_device(&tenant, Some(device.clone()), device_body).await.unwrap();
    let credentials = serde_json::from_value(serde_json::json!([
        {"type": "hashed-password", "auth-id": "d1", "secrets": [{"pwd-plain": "device-secret"}]}
    ]))
    .unwrap();
    management.set_credentials(&tenant, &device, credentials, None).await.unwrap();
}

/// POSTs `body` to `path` as `d1@t1` over a plain socket; returns the status code.
async fn http_upload(addr: SocketAddr, path: &str, body: &str) -> u16 {
    // base64("d1@t1:device-secret")
    let auth = "ZDFAdDE6ZGV2aWNlLXNlY3JldA==";
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: ferrule\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0)
}

async fn application(
    platform: &Platform,
    address: &str,
) -> (ConnectionHandle<()>, SessionHandle<()>, Receiver) {
    let url = format!("amqp://{}", platform.addr("amqp").unwrap());
    let mut connection = Connection::builder()
        .container_id("platform-test")
        .sasl_profile(SaslProfile::Plain {
            username: "app@t1".into(),
            password: "app-secret".into(),
        })
        .open(url.as_str())
        .await
        .expect("the application connects");
    let mut session = Session::begin(&mut connection).await.unwrap();
    let receiver = Receiver::attach(&mut session, "r", address).await.unwrap();
    (connection, session, receiver)
}

async fn receive(receiver: &mut Receiver) -> (String, Option<String>) {
    let delivery = tokio::time::timeout(Duration::from_secs(10), receiver.recv::<Body<Value>>())
        .await
        .expect("a message in time")
        .expect("a message");
    receiver.accept(&delivery).await.unwrap();
    let message = delivery.into_message();
    let body = match message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
        other => panic!("unexpected body {other:?}"),
    };
    let device = message.application_properties.as_ref().and_then(|p| match p.get("device_id") {
        Some(SimpleValue::String(s)) => Some(s.clone()),
        _ => None,
    });
    (String::from_utf8(body).unwrap(), device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reaches_an_application_and_events_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(&config(dir.path())).await.expect("the platform starts");
    for name in ["amqp", "ops", "registry", "http", "mqtt", "coaps"] {
        assert!(platform.addr(name).is_some(), "{name} is listening");
    }
    provision(&platform).await;

    // Telemetry: direct, to the attached application.
    let (mut connection, mut session, mut receiver) = application(&platform, "telemetry/t1").await;
    let http = platform.addr("http").unwrap();
    let mut status = 0;
    for _ in 0..50 {
        // 503 until the receiver's first credit has arrived.
        status = http_upload(http, "/telemetry", "hello").await;
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 202);
    assert_eq!(receive(&mut receiver).await, ("hello".into(), Some("d1".into())));
    receiver.close().await.ok();
    session.end().await.ok();
    connection.close().await.ok();

    // An event with nobody attached is stored; shutdown flushes the store.
    assert_eq!(http_upload(http, "/event", "kept").await, 202);
    platform.shutdown().await.expect("a clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "the HTTP adapter stopped listening"
    );

    let platform = Platform::start(&config(dir.path())).await.expect("the platform restarts");
    let (mut connection, mut session, mut receiver) = application(&platform, "event/t1").await;
    assert_eq!(receive(&mut receiver).await, ("kept".into(), Some("d1".into())));
    receiver.close().await.ok();
    session.end().await.ok();
    connection.close().await.ok();
    platform.shutdown().await.expect("a clean shutdown");
}
