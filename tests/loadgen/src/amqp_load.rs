//! AMQP 1.0 application side (fe2o3-amqp client): `amqp-recv` (downstream consumer),
//! `amqp-send` (a plain producer to any address, e.g. straight to RabbitMQ) and `commands`
//! (request/response commands to MQTT devices run here too).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Args;
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{Body, Header, Message, MessageId, Outcome, Properties};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::mqtt;
use crate::mqtt_load::{Client, Target};
use crate::util::{self, Collector, Latencies, LocalBatch, Result};

/// The application's AMQP connection.
#[derive(Args, Debug, Clone)]
pub struct Amqp {
    /// AMQP listener (host:port).
    #[arg(long, default_value = "127.0.0.1:5672")]
    pub amqp: String,
    /// SASL PLAIN user, e.g. app@bench (none: SASL ANONYMOUS).
    #[arg(long)]
    pub amqp_user: Option<String>,
    /// SASL PLAIN password.
    #[arg(long)]
    pub amqp_password: Option<String>,
}

async fn open(a: &Amqp, id: &str) -> Result<(ConnectionHandle<()>, SessionHandle<()>)> {
    let mut builder =
        Connection::builder().container_id(format!("ferrule-loadgen-{}-{id}", std::process::id()));
    if let Some(user) = &a.amqp_user {
        builder = builder.sasl_profile(SaslProfile::Plain {
            username: user.clone(),
            password: a.amqp_password.clone().unwrap_or_default(),
        });
    }
    // Our own socket: fe2o3's `open(url)` leaves Nagle on, which delays small frames
    // (dispositions, flows) by up to a delayed ACK (~40 ms).
    let addr = util::resolve(&a.amqp)?;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let host = addr.ip().to_string();
    let mut connection = builder
        .hostname(host.as_str())
        .sasl_hostname(host.as_str())
        .open_with_stream(stream)
        .await?;
    let session = Session::begin(&mut connection).await?;
    Ok((connection, session))
}

fn data_of(body: &Body<Value>) -> &[u8] {
    match body {
        Body::Data(batch) => batch.iter().next().map(|d| &d.0[..]).unwrap_or(&[]),
        _ => &[],
    }
}

// ---------------------------------------------------------------------------------------
// amqp-recv

#[derive(Args, Debug)]
pub struct RecvArgs {
    #[command(flatten)]
    pub amqp: Amqp,
    /// Source address, e.g. telemetry/bench or event/bench.
    #[arg(long)]
    pub address: String,
    /// Receiver links, each on its own connection (competing consumers).
    #[arg(long, default_value_t = 1)]
    pub links: usize,
    /// Link credit (refilled automatically).
    #[arg(long, default_value_t = 5000)]
    pub credit: u32,
    /// Accept at most this many messages per second per link (a slow application);
    /// default: as fast as they come.
    #[arg(long)]
    pub rate: Option<f64>,
    #[command(flatten)]
    pub until: util::Until,
}

pub async fn run_recv(a: RecvArgs) -> Result<()> {
    let collector = Arc::new(Collector::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for k in 0..a.links.max(1) {
        let (mut connection, mut session) = open(&a.amqp, &format!("recv{k}")).await?;
        let mut receiver = Receiver::builder()
            .name(format!("loadgen-recv-{}-{k}", std::process::id()))
            .source(a.address.clone())
            .credit_mode(CreditMode::Auto(a.credit))
            .attach(&mut session)
            .await?;
        let (collector, mut stop, rate) = (collector.clone(), stop_rx.clone(), a.rate);
        tasks.push(tokio::spawn(async move {
            let mut batch = LocalBatch::default();
            // Pacing of a slow application: the n-th message is accepted n/rate seconds
            // after the first.
            let mut paced: Option<(tokio::time::Instant, u64)> = None;
            let mut flush = tokio::time::interval(Duration::from_millis(10));
            let mut error = None;
            loop {
                tokio::select! {
                    d = receiver.recv::<Body<Value>>() => match d {
                        Ok(delivery) => {
                            let notification = delivery
                                .message()
                                .properties
                                .as_ref()
                                .and_then(|p| p.content_type.as_ref())
                                .is_some_and(|ct| ct.as_str().starts_with("application/vnd.eclipse-hono"));
                            if notification || !batch.message(data_of(delivery.body())) {
                                collector.skipped.fetch_add(1, Relaxed);
                            }
                            if let Some(rate) = rate {
                                let (first, n) = paced.get_or_insert((tokio::time::Instant::now(), 0));
                                *n += 1;
                                let due = *first + Duration::from_secs_f64(*n as f64 / rate);
                                tokio::time::sleep_until(due).await;
                            }
                            if let Err(e) = receiver.accept(&delivery).await {
                                collector.errors.fetch_add(1, Relaxed);
                                error = Some(format!("accept: {e}"));
                                break;
                            }
                            if batch.len() >= 4096 {
                                collector.flush(&mut batch);
                            }
                        }
                        Err(e) => {
                            collector.errors.fetch_add(1, Relaxed);
                            error = Some(format!("recv: {e}"));
                            break;
                        }
                    },
                    _ = flush.tick() => collector.flush(&mut batch),
                    _ = stop.changed() => break,
                }
            }
            collector.flush(&mut batch);
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = receiver.close().await;
                let _ = session.end().await;
                let _ = connection.close().await;
            })
            .await;
            error
        }));
    }
    let end = a.until.wait(&collector, "attached").await;
    let _ = stop_tx.send(true);
    let mut first_error = None;
    for t in tasks {
        if let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(5), t).await {
            first_error.get_or_insert(e);
        }
    }
    let mut m = collector.report("amqp-recv", a.until.expect, end);
    m.insert("address".into(), json!(a.address));
    if let Some(e) = first_error {
        m.insert("first_error".into(), json!(e));
    }
    util::emit(m);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// amqp-send

#[derive(Args, Debug)]
pub struct SendArgs {
    #[command(flatten)]
    pub amqp: Amqp,
    /// Target address, taken as is (no Hono conventions), e.g. `/amq/queue/event.x` at
    /// RabbitMQ or `telemetry/bench` at Ferrule.
    #[arg(long)]
    pub address: String,
    #[command(flatten)]
    pub amount: util::Amount<10_000>,
    /// Payload size in bytes (a data section; at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Durable messages (`header.durable = true`).
    #[arg(long)]
    pub durable: bool,
    /// Unsettled transfers in flight (sent, outcome not yet received).
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
}

/// One producer link on its own connection and session: unsettled transfers, `--window`
/// in flight; counts `accepted` outcomes and their latency (send → outcome). Detaches
/// rather than closes at the end (RabbitMQ 3.x does not answer a closing detach).
pub async fn run_send(a: SendArgs) -> Result<()> {
    let (mut connection, mut session) = open(&a.amqp, "send").await?;
    let mut sender = Sender::attach(
        &mut session,
        format!("loadgen-send-{}", std::process::id()),
        a.address.clone(),
    )
    .await?;
    let window = Arc::new(Semaphore::new(a.window.max(1)));
    let mut outcomes = tokio::task::JoinSet::new();
    let mut stats = util::Stats::default();
    let tally = |stats: &mut util::Stats, r: (std::result::Result<Outcome, String>, u64)| {
        match r.0 {
            Ok(Outcome::Accepted(_)) => {
                stats.ok += 1;
                stats.lat.record_since(r.1);
            }
            Ok(other) => {
                let kind = format!("{other:?}");
                let kind = kind.split('(').next().unwrap_or("outcome").to_owned();
                stats.fail(format!("outcome {other:?}"));
                stats.count(kind);
            }
            Err(e) => {
                stats.fail(e);
                stats.count("error");
            }
        }
        stats.finished = Some(Instant::now());
    };
    let mut body = util::payload(a.size);
    let start = Instant::now();
    let deadline = a.amount.deadline(start);
    loop {
        if deadline.is_none() && stats.sent >= a.amount.count
            || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        let Ok(permit) = window.clone().acquire_owned().await else { break };
        let now = util::now_ns();
        body[..8].copy_from_slice(&now.to_be_bytes());
        let mut message = Message::builder().data(Binary::from(body.clone())).build();
        if a.durable {
            message.header = Some(Header { durable: true, ..Default::default() });
        }
        match sender.send_batchable(message).await {
            Ok(fut) => {
                stats.sent += 1;
                outcomes.spawn(async move {
                    let outcome = fut.await.map_err(|e| format!("outcome: {e}"));
                    drop(permit);
                    (outcome, now)
                });
            }
            Err(e) => {
                stats.fail(format!("send: {e}"));
                break;
            }
        }
        while let Some(r) = outcomes.try_join_next() {
            tally(&mut stats, r.unwrap_or_else(|e| (Err(e.to_string()), 0)));
        }
    }
    while let Some(r) = outcomes.join_next().await {
        tally(&mut stats, r.unwrap_or_else(|e| (Err(e.to_string()), 0)));
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = sender.detach().await;
        let _ = session.end().await;
        let _ = connection.close().await;
    })
    .await;
    let seconds = stats.seconds_since(start);
    let mut m = util::base("amqp-send", stats.ok, seconds, stats.errors);
    m.insert("sent".into(), json!(stats.sent));
    m.insert("address".into(), json!(a.address));
    m.insert("durable".into(), json!(a.durable));
    m.insert("window".into(), json!(a.window));
    stats.report("outcomes", "outcome_", &mut m);
    util::emit(m);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// commands

#[derive(Args, Debug)]
pub struct CommandArgs {
    #[command(flatten)]
    pub amqp: Amqp,
    #[command(flatten)]
    pub target: Target,
    /// Tenant of the devices and the application.
    #[arg(long, default_value = "bench")]
    pub tenant: String,
    /// Device id template of the command targets (`{i}`), matching --username's devices.
    #[arg(long, default_value = "dev{i}")]
    pub device_id: String,
    /// MQTT devices connected here (they answer every request with status 200).
    #[arg(long, default_value_t = 10)]
    pub device_count: usize,
    /// Commands in flight (sent, response not yet received).
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    #[command(flatten)]
    pub amount: util::Amount<10_000>,
    /// QoS of the devices' subscription and of their responses.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    /// Seconds to wait for the last responses.
    #[arg(long, default_value_t = 15.0)]
    pub drain_timeout: f64,
}

/// One device: answers `command///req/REQ-ID/NAME` on `command///res/REQ-ID/200`.
async fn device_loop(
    mut conn: crate::mqtt_load::Conn,
    qos: u8,
    answered: Arc<AtomicU64>,
) -> Option<String> {
    let (reader, writer) = (&mut conn.0, &mut conn.1);
    let mut out = BytesMut::with_capacity(4096);
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(20),
        Duration::from_secs(20),
    );
    loop {
        loop {
            match reader.try_next() {
                Ok(Some(p)) if p.kind() == mqtt::PUBLISH => {
                    let Ok(publish) = p.publish() else { return Some("malformed PUBLISH".into()) };
                    if publish.qos == 1 {
                        mqtt::puback(&mut out, publish.packet_id);
                    }
                    // command///req/REQ-ID/NAME
                    let topic = String::from_utf8_lossy(&publish.topic);
                    let mut parts = topic.splitn(6, '/');
                    let req_id = parts.nth(4).unwrap_or("");
                    if !req_id.is_empty() {
                        let res = format!("command///res/{req_id}/200");
                        let id = (answered.fetch_add(1, Relaxed) % 65535 + 1) as u16;
                        mqtt::publish(&mut out, res.as_bytes(), qos, id, &publish.payload);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Some(format!("device read: {e}")),
            }
        }
        if !out.is_empty() {
            if let Err(e) = writer.write_all(&out).await {
                return Some(format!("device write: {e}"));
            }
            out.clear();
        }
        tokio::select! {
            n = reader.fill() => match n {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(format!("device read: {e}")),
            },
            _ = ping.tick() => mqtt::pingreq(&mut out),
        }
    }
}

pub async fn run_commands(a: CommandArgs) -> Result<()> {
    util::raise_nofile(1 << 20);
    // Devices first: connected and subscribed before the first command.
    let client = Arc::new(Client::new(&a.target)?);
    let (conns, failed, first) = client.open_many(a.device_count, 16).await;
    if failed > 0 {
        return Err(
            format!("{failed} device connections failed: {}", first.unwrap_or_default()).into()
        );
    }
    let answered = Arc::new(AtomicU64::new(0));
    let mut devices = Vec::new();
    for (mut reader, mut writer) in conns {
        let granted = reader.subscribe_and_wait(&mut writer, "command///req/#", a.qos).await?;
        if granted > 1 {
            return Err(format!("SUBSCRIBE command///req/# refused ({granted:#04x})").into());
        }
        devices.push(tokio::spawn(device_loop((reader, writer), a.qos, answered.clone())));
    }

    let (mut connection, mut session) = open(&a.amqp, "app").await?;
    let reply_to = format!("command_response/{}/loadgen-{}", a.tenant, std::process::id());
    let mut receiver = Receiver::builder()
        .name("loadgen-replies")
        .source(reply_to.clone())
        .credit_mode(CreditMode::Auto(a.window.max(1) as u32 * 4))
        .attach(&mut session)
        .await?;
    let mut sender =
        Sender::attach(&mut session, "loadgen-commands", format!("command/{}", a.tenant)).await?;

    let window = Arc::new(Semaphore::new(a.window.max(1)));
    let pending: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let errors = Arc::new(AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let done = Arc::new(AtomicU64::new(0));

    let replies = {
        let (window, pending, errors, done) =
            (window.clone(), pending.clone(), errors.clone(), done.clone());
        tokio::spawn(async move {
            let mut lat = Latencies::with_capacity(1 << 16);
            let mut last = Instant::now();
            while let Ok(delivery) = receiver.recv::<Body<Value>>().await {
                let _ = receiver.accept(&delivery).await;
                let props = delivery.message().properties.as_ref();
                let id = match props.and_then(|p| p.correlation_id.as_ref()) {
                    Some(MessageId::String(s)) => {
                        s.strip_prefix('c').and_then(|n| n.parse::<u64>().ok())
                    }
                    Some(MessageId::Ulong(n)) => Some(*n),
                    _ => None,
                };
                let status_ok = delivery
                    .message()
                    .application_properties
                    .as_ref()
                    .and_then(|ap| ap.0.get("status"))
                    .is_some_and(|v| {
                        matches!(
                            v,
                            SimpleValue::Int(200)
                                | SimpleValue::Uint(200)
                                | SimpleValue::Long(200)
                                | SimpleValue::Ulong(200)
                                | SimpleValue::Short(200)
                                | SimpleValue::Ushort(200)
                        )
                    });
                let sent = id.and_then(|id| pending.lock().unwrap().remove(&id));
                if let Some(sent) = sent {
                    if status_ok {
                        lat.record_since(sent);
                        done.fetch_add(1, Relaxed);
                    } else {
                        errors.fetch_add(1, Relaxed);
                    }
                    last = Instant::now();
                    window.add_permits(1);
                }
            }
            (lat, last, receiver)
        })
    };

    let start = Instant::now();
    let deadline = a.amount.deadline(start);
    let mut body = util::payload(a.size);
    let mut sent = 0u64;
    let mut outcomes = tokio::task::JoinSet::new();
    loop {
        if deadline.is_none() && sent >= a.amount.count
            || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        let Ok(permit) = window.acquire().await else { break };
        permit.forget();
        let n = sent;
        sent += 1;
        let device = util::expand(&a.device_id, (n % a.device_count.max(1) as u64) as usize);
        let now = util::now_ns();
        body[..8].copy_from_slice(&now.to_be_bytes());
        pending.lock().unwrap().insert(n, now);
        let message = Message::builder()
            .properties(
                Properties::builder()
                    .message_id(MessageId::String(format!("c{n}")))
                    .to(format!("command/{}/{device}", a.tenant))
                    .subject("bench")
                    .reply_to(reply_to.clone())
                    .build(),
            )
            .data(Binary::from(body.clone()))
            .build();
        match sender.send_batchable(message).await {
            Ok(fut) => {
                let (window, pending, errors, first_error) =
                    (window.clone(), pending.clone(), errors.clone(), first_error.clone());
                outcomes.spawn(async move {
                    let outcome = fut.await;
                    if !matches!(outcome, Ok(Outcome::Accepted(_))) {
                        // Not taken by the device: no response will come.
                        if pending.lock().unwrap().remove(&n).is_some() {
                            errors.fetch_add(1, Relaxed);
                            first_error
                                .lock()
                                .unwrap()
                                .get_or_insert(format!("command outcome {outcome:?}"));
                            window.add_permits(1);
                        }
                    }
                });
            }
            Err(e) => {
                errors.fetch_add(1, Relaxed);
                first_error.lock().unwrap().get_or_insert(format!("send: {e}"));
                pending.lock().unwrap().remove(&n);
                break;
            }
        }
        while outcomes.try_join_next().is_some() {}
    }
    // Wait for the responses still expected.
    let drain_until = Instant::now() + Duration::from_secs_f64(a.drain_timeout);
    while !pending.lock().unwrap().is_empty() && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let missing = pending.lock().unwrap().len() as u64;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = sender.close().await;
        let _ = session.end().await;
        let _ = connection.close().await;
    })
    .await;
    let (lat, last) = match tokio::time::timeout(Duration::from_secs(3), replies).await {
        Ok(Ok((lat, last, _))) => (lat, last),
        _ => (Latencies::default(), Instant::now()),
    };
    for d in devices {
        d.abort();
    }
    let ok = done.load(Relaxed);
    let seconds = (last.max(start) - start).as_secs_f64();
    let mut m = util::base("commands", ok, seconds, errors.load(Relaxed) + missing);
    m.insert("sent".into(), json!(sent));
    m.insert("missing".into(), json!(missing));
    m.insert("devices".into(), json!(a.device_count));
    // Requests the devices answered: more than `sent` means a command reached a device
    // twice.
    m.insert("device_answers".into(), json!(answered.load(Relaxed)));
    m.insert("window".into(), json!(a.window));
    lat.report("", &mut m);
    if let Some(e) = first_error.lock().unwrap().clone() {
        m.insert("first_error".into(), json!(e));
    }
    util::emit(m);
    Ok(())
}
