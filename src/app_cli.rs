//! `ferrule consume` and `ferrule command`: the platform's application side from the command
//! line (as hono-cli does), speaking AMQP 1.0 to a running platform like any application:
//! SASL PLAIN as `USER@TENANT`, Hono's addresses.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Session};

/// Where and as whom to connect.
#[derive(Debug, Clone, Args)]
pub struct AmqpConnection {
    /// The platform's AMQP endpoint (host:port).
    #[arg(long, env = "FERRULE_AMQP", default_value = "127.0.0.1:5672")]
    pub amqp: String,
    /// Application user name, without the tenant (`NAME@TENANT` is sent; the generated
    /// `admin@*` user logs in for any tenant).
    #[arg(long, env = "FERRULE_AMQP_USER", default_value = "admin")]
    pub user: String,
    /// Its password; default: read from DATA_DIR/admin-credentials.
    #[arg(long, env = "FERRULE_AMQP_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// The platform's data directory (for admin-credentials).
    #[arg(long, env = "FERRULE_DATA_DIR", default_value = "data")]
    pub data_dir: std::path::PathBuf,
}

/// What to consume.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Endpoint {
    Telemetry,
    Event,
}

/// Output format of `consume`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// One aligned text line per message.
    Table,
}

/// The application subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum AppCommand {
    /// Receive a tenant's telemetry or events and print them (stops after --count, or
    /// after --timeout without a message, or on Ctrl-C).
    ///
    /// Examples:
    ///   ferrule consume telemetry my-tenant
    ///   ferrule consume event my-tenant --format table --count 10
    #[command(verbatim_doc_comment)]
    Consume {
        endpoint: Endpoint,
        tenant: String,
        #[command(flatten)]
        conn: AmqpConnection,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds without a message.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Send a command to a device: request/response (prints the device's response) or
    /// one-way (--one-way; prints the outcome). Exits with 1 if the device did not answer
    /// in time or the platform did not take the command.
    ///
    /// Examples:
    ///   ferrule command my-tenant my-device setVolume --data '{"level": 7}'
    ///   ferrule command my-tenant my-device reboot --one-way
    #[command(verbatim_doc_comment)]
    Command {
        tenant: String,
        device: String,
        /// The command's name (AMQP subject).
        name: String,
        /// Payload (UTF-8).
        #[arg(long)]
        data: Option<String>,
        /// Content type of the payload.
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// No response expected.
        #[arg(long)]
        one_way: bool,
        /// Seconds to wait for the response (request/response).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[command(flatten)]
        conn: AmqpConnection,
    },
}

/// Runs one application subcommand.
///
/// # Errors
/// Connection or protocol failures, a refused or unanswered command.
pub async fn run(command: AppCommand) -> anyhow::Result<()> {
    match command {
        AppCommand::Consume { endpoint, tenant, conn, format, count, timeout } => {
            consume(endpoint, &tenant, &conn, format, count, timeout).await
        }
        AppCommand::Command {
            tenant,
            device,
            name,
            data,
            content_type,
            one_way,
            timeout,
            conn,
        } => {
            let request = Request { tenant, device, name, data, content_type };
            send_command(&conn, request, one_way, Duration::from_secs(timeout)).await
        }
    }
}

async fn open(
    conn: &AmqpConnection,
    tenant: &str,
) -> anyhow::Result<(ConnectionHandle<()>, SessionHandle<()>)> {
    let password = match &conn.password {
        Some(password) => password.clone(),
        None => {
            let path = conn.data_dir.join("admin-credentials");
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("no --password and cannot read {} (use --data-dir)", path.display())
            })?;
            text.lines()
                .find_map(|l| l.strip_prefix("password="))
                .map(str::to_owned)
                .with_context(|| format!("{} has no password= line", path.display()))?
        }
    };
    let username = format!("{}@{tenant}", conn.user);
    let url = format!("amqp://{}", conn.amqp);
    let mut connection = Connection::builder()
        .container_id(format!("ferrule-cli-{}", uuid::Uuid::new_v4().simple()))
        .sasl_profile(SaslProfile::Plain { username: username.clone(), password })
        .open(url.as_str())
        .await
        .with_context(|| format!("connecting to {url} as {username}"))?;
    let session = Session::begin(&mut connection).await.context("beginning a session")?;
    Ok((connection, session))
}

async fn consume(
    endpoint: Endpoint,
    tenant: &str,
    conn: &AmqpConnection,
    format: Format,
    count: Option<u64>,
    timeout: Option<u64>,
) -> anyhow::Result<()> {
    let address = match endpoint {
        Endpoint::Telemetry => format!("telemetry/{tenant}"),
        Endpoint::Event => format!("event/{tenant}"),
    };
    let (mut connection, mut session) = open(conn, tenant).await?;
    let mut receiver = Receiver::attach(&mut session, "ferrule-cli-consumer", address.as_str())
        .await
        .with_context(|| format!("attaching to {address}"))?;
    eprintln!("ferrule: receiving from {address}");
    let mut received = 0u64;
    while count.is_none_or(|max| received < max) {
        let next = receiver.recv::<Body<Value>>();
        let delivery = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            d = async {
                match timeout {
                    Some(secs) => tokio::time::timeout(Duration::from_secs(secs), next).await.ok(),
                    None => Some(next.await),
                }
            } => match d {
                Some(d) => d.context("receiving")?,
                None => break,
            },
        };
        receiver.accept(&delivery).await.context("accepting")?;
        let line = describe(delivery.message());
        match format {
            Format::Json => println!("{line}"),
            Format::Table => println!("{}", table_row(&line)),
        }
        received += 1;
    }
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    Ok(())
}

/// A message as JSON: Hono's properties, the payload as text (or base64 if not UTF-8).
fn describe(message: &Message<Body<Value>>) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let annotations = message.message_annotations.as_ref();
    for key in ["tenant_id", "device_id", "x-opt-retain"] {
        let value = annotations.and_then(|a| {
            a.0.iter().find(|(k, _)| format!("{k:?}").contains(key)).map(|(_, v)| v.clone())
        });
        if let Some(value) = value {
            out.insert(key.to_owned(), value_json(&value));
        }
    }
    if let Some(p) = &message.properties {
        if let Some(ct) = &p.content_type {
            out.insert("content-type".into(), ct.as_str().into());
        }
        if let Some(t) = &p.creation_time {
            out.insert("creation-time".into(), t.milliseconds().into());
        }
        if let Some(subject) = &p.subject {
            out.insert("subject".into(), subject.as_str().into());
        }
    }
    if let Some(ttl) = message.header.as_ref().and_then(|h| h.ttl) {
        out.insert("ttl-ms".into(), ttl.into());
    }
    if let Some(ApplicationProperties(app)) = &message.application_properties {
        let props: serde_json::Map<_, _> =
            app.iter().map(|(k, v)| (k.clone(), simple_json(v))).collect();
        out.insert("properties".into(), props.into());
    }
    let payload: Vec<u8> = match &message.body {
        Body::Data(batch) => batch.iter().flat_map(|d| d.0.iter().copied()).collect(),
        Body::Value(AmqpValue(Value::String(s))) => s.clone().into_bytes(),
        _ => Vec::new(),
    };
    match String::from_utf8(payload) {
        Ok(text) => out.insert("payload".into(), text.into()),
        Err(e) => {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
            out.insert("payload-base64".into(), b64.into())
        }
    };
    out.into()
}

fn table_row(line: &serde_json::Value) -> String {
    let text = |v: Option<&serde_json::Value>| match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    let props = line.get("properties");
    format!(
        "{:<20} {:<30} {:<10} {}",
        text(props.and_then(|p| p.get("device_id")).or(line.get("device_id"))),
        text(line.get("content-type")),
        text(props.and_then(|p| p.get("orig_adapter"))),
        text(line.get("payload").or(line.get("payload-base64"))),
    )
}

fn simple_json(v: &SimpleValue) -> serde_json::Value {
    match v {
        SimpleValue::Bool(b) => (*b).into(),
        SimpleValue::String(s) => s.as_str().into(),
        SimpleValue::Int(n) => (*n).into(),
        SimpleValue::Long(n) => (*n).into(),
        SimpleValue::Uint(n) => (*n).into(),
        SimpleValue::Ulong(n) => (*n).into(),
        SimpleValue::Short(n) => (*n).into(),
        SimpleValue::Ushort(n) => (*n).into(),
        SimpleValue::Byte(n) => (*n).into(),
        SimpleValue::Ubyte(n) => (*n).into(),
        other => format!("{other:?}").into(),
    }
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Bool(b) => (*b).into(),
        Value::String(s) => s.as_str().into(),
        other => format!("{other:?}").into(),
    }
}

struct Request {
    tenant: String,
    device: String,
    name: String,
    data: Option<String>,
    content_type: String,
}

async fn send_command(
    conn: &AmqpConnection,
    request: Request,
    one_way: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let Request { tenant, device, name, data, content_type } = request;
    let (connection, mut session) = open(conn, &tenant).await?;
    let reply_to = format!("command_response/{tenant}/cli-{}", uuid::Uuid::new_v4().simple());
    // The reply link first: the response must find it.
    let mut receiver = if one_way {
        None
    } else {
        let receiver = Receiver::attach(&mut session, "ferrule-cli-replies", reply_to.as_str())
            .await
            .with_context(|| format!("attaching to {reply_to}"))?;
        Some(receiver)
    };
    let address = format!("command/{tenant}");
    let mut sender = Sender::attach(&mut session, "ferrule-cli-commands", address.as_str())
        .await
        .with_context(|| format!("attaching to {address}"))?;
    let correlation = uuid::Uuid::new_v4().simple().to_string();
    let message = Message::builder()
        .properties(Properties {
            to: Some(format!("command/{tenant}/{device}")),
            subject: Some(name.clone()),
            message_id: Some(correlation.clone().into()),
            reply_to: (!one_way).then(|| reply_to.clone()),
            correlation_id: (!one_way).then(|| correlation.clone().into()),
            content_type: Some(content_type.into()),
            ..Default::default()
        })
        .data(Binary::from(data.unwrap_or_default().into_bytes()))
        .build();
    let outcome = sender.send(message).await.context("sending the command")?;
    let taken = matches!(outcome, Outcome::Accepted(_));
    if one_way || !taken {
        let state = match &outcome {
            Outcome::Accepted(_) => "accepted".to_owned(),
            Outcome::Released(_) => "released (the device is not connected)".to_owned(),
            Outcome::Rejected(r) => format!(
                "rejected: {}",
                r.error.as_ref().map_or(String::new(), |e| format!(
                    "{:?} {}",
                    e.condition,
                    e.description.clone().unwrap_or_default()
                ))
            ),
            Outcome::Modified(_) => "modified".to_owned(),
            #[allow(unreachable_patterns)]
            _ => "unknown".to_owned(),
        };
        println!("{}", serde_json::json!({ "outcome": state }));
        close(connection, session, sender).await;
        if !taken {
            bail!("the platform did not take the command: {state}");
        }
        return Ok(());
    }
    let Some(receiver) = receiver.as_mut() else { return Ok(()) };
    let response = tokio::time::timeout(timeout, receiver.recv::<Body<Value>>()).await;
    let result = match response {
        Ok(Ok(delivery)) => {
            receiver.accept(&delivery).await.context("accepting the response")?;
            let mut line = describe(delivery.message());
            if let Some(status) = line.get("properties").and_then(|p| p.get("status")).cloned() {
                line.as_object_mut().map(|o| o.insert("status".into(), status));
            }
            println!("{line}");
            Ok(())
        }
        Ok(Err(e)) => Err(anyhow::Error::from(e).context("receiving the response")),
        Err(_) => Err(anyhow::anyhow!("no response within {} s", timeout.as_secs())),
    };
    close(connection, session, sender).await;
    result
}

async fn close(
    mut connection: ConnectionHandle<()>,
    mut session: SessionHandle<()>,
    sender: Sender,
) {
    let _ = sender.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
}
