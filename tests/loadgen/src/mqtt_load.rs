//! MQTT load: publishers (`mqtt-pub`), subscribers (`mqtt-sub`), idle connections
//! (`idle`), CONNECT storms (`connect-storm`), and the devices of `commands`.
//!
//! Size: every MQTT load shape of the benchmark suite, sharing one raw client and its
//! statistics.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::Args;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, Semaphore};

use crate::mqtt::{self, Reader};
use crate::util::{self, Collector, Latencies, LocalBatch, Result, Stats};

/// Where and as whom MQTT clients connect.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Broker address (host:port); a comma-separated list spreads the connections over
    /// several servers (connection `i` goes to the `i`-th modulo their number).
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub host: String,
    /// Username template, `{i}` = client index (modulo --devices), e.g. `dev{i}@bench`.
    #[arg(long)]
    pub username: Option<String>,
    /// Password (the same for every client).
    #[arg(long)]
    pub password: Option<String>,
    /// Number of distinct devices behind `{i}` in --username (0: one per client).
    #[arg(long, default_value_t = 0)]
    pub devices: usize,
    /// Client id template, `{i}` = client index (a process id suffix keeps runs apart).
    #[arg(long, default_value = "lg-{i}")]
    pub client_id: String,
    /// Source addresses to spread the connections over, e.g. 127.0.0.2,127.0.0.3.
    #[arg(long, default_value = "")]
    pub sources: String,
    /// MQTT keep-alive in seconds (PINGREQ every half of it on long-lived connections).
    #[arg(long, default_value_t = 60)]
    pub keepalive: u16,
}

pub type Conn = (Reader<OwnedReadHalf>, OwnedWriteHalf);

pub struct Client {
    addrs: Vec<SocketAddr>,
    sources: Vec<IpAddr>,
    t: Target,
    tag: String,
}

impl Client {
    pub fn new(t: &Target) -> Result<Client> {
        Ok(Client {
            addrs: t.host.split(',').map(|h| util::resolve(h.trim())).collect::<Result<_>>()?,
            sources: util::parse_sources(&t.sources)?,
            t: t.clone(),
            tag: std::process::id().to_string(),
        })
    }

    pub fn username(&self, i: usize) -> Option<String> {
        self.t.username.as_ref().map(|u| util::expand(u, util::device(i, self.t.devices)))
    }

    fn client_id(&self, i: usize, suffix: &str) -> String {
        format!("{}-{}{}", util::expand(&self.t.client_id, i), self.tag, suffix)
    }

    /// Connects client `i` (as device `device` for the username) and completes the
    /// CONNECT handshake; `small` keeps the read buffer tiny (idle connections).
    pub async fn open_as(
        &self,
        i: usize,
        device: usize,
        suffix: &str,
        small: bool,
    ) -> Result<Conn> {
        let addr = self.addrs[i % self.addrs.len()];
        let stream = util::connect_from(addr, util::spread(&self.sources, i)).await?;
        let (r, mut w) = stream.into_split();
        let mut reader = if small { Reader::small(r) } else { Reader::new(r) };
        let user = self.username(device);
        let rc = reader
            .handshake(
                &mut w,
                &self.client_id(i, suffix),
                user.as_deref(),
                self.t.password.as_deref(),
                self.t.keepalive,
            )
            .await?;
        if rc != 0 {
            return Err(format!("CONNACK return code {rc:#04x}").into());
        }
        Ok((reader, w))
    }

    pub async fn open(&self, i: usize) -> Result<Conn> {
        self.open_as(i, i, "", false).await
    }

    /// Opens `n` connections, at most `parallel` handshakes at a time. Failed ones are
    /// counted and described (first error).
    pub async fn open_many(
        self: &Arc<Self>,
        n: usize,
        parallel: usize,
    ) -> (Vec<Conn>, u64, Option<String>) {
        let sem = Arc::new(Semaphore::new(parallel.max(1)));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (client, sem) = (self.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                client.open(i).await.map_err(|e| e.to_string())
            }));
        }
        let (mut ok, mut failed, mut first) = (Vec::with_capacity(n), 0, None);
        for t in tasks {
            match t.await.unwrap_or_else(|e| Err(e.to_string())) {
                Ok(c) => ok.push(c),
                Err(e) => {
                    failed += 1;
                    first.get_or_insert(e);
                }
            }
        }
        (ok, failed, first)
    }
}

// ---------------------------------------------------------------------------------------
// mqtt-pub

#[derive(Args, Debug)]
pub struct PubArgs {
    #[command(flatten)]
    pub target: Target,
    /// Concurrent connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Topic (template, `{i}` = connection index, `{k}` = the device a gateway publishes
    /// for, see `--topic-devices`).
    #[arg(long, default_value = "telemetry")]
    pub topic: String,
    /// A gateway's devices: each connection publishes for `{k}` = 0, 1, … N-1 in turn.
    #[arg(long, default_value_t = 1)]
    pub topic_devices: usize,
    /// QoS 0 or 1.
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    #[command(flatten)]
    pub send: util::Sending<100_000>,
    /// QoS 1: unacknowledged PUBLISHes per connection.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Seconds to wait for outstanding PUBACKs at the end.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
}

pub async fn run_pub(a: PubArgs) -> Result<()> {
    util::raise_nofile(1 << 20);
    if a.qos > 1 {
        return Err("--qos must be 0 or 1".into());
    }
    let client = Arc::new(Client::new(&a.target)?);
    let (conns, connect_errors, first_error) = client.open_many(a.connections, 64).await;
    if conns.is_empty() {
        return Err(format!("no connection: {}", first_error.unwrap_or_default()).into());
    }
    let n = conns.len();
    let rate = a.send.rate_of(n);
    let start = Instant::now();
    let deadline = a.send.amount.deadline(start);
    let mut tasks = Vec::new();
    for (i, (reader, writer)) in conns.into_iter().enumerate() {
        let job = Job {
            topics: (0..a.topic_devices.max(1))
                .map(|k| util::expand(&a.topic, i).replace("{k}", &k.to_string()).into_bytes())
                .collect(),
            size: a.send.size,
            quota: a.send.amount.quota(n, i),
            deadline,
            rate,
            start,
            window: a.window.max(1),
            drain: Duration::from_secs_f64(a.drain_timeout),
        };
        tasks.push(tokio::spawn(async move {
            if a.qos == 0 {
                publish_qos0(reader, writer, job).await
            } else {
                publish_qos1(reader, writer, job).await
            }
        }));
    }
    let mut total = util::join_all(tasks).await;
    let seconds = total.seconds_since(start);
    let done = if a.qos == 1 { total.ok } else { total.sent };
    let mut m = util::base("mqtt-pub", total.sent, seconds, total.errors + connect_errors);
    m.insert("msgs_per_s".into(), json!(util::per_s(done, seconds)));
    m.insert("qos".into(), json!(a.qos));
    m.insert("connections".into(), json!(n));
    m.insert("connect_errors".into(), json!(connect_errors));
    if a.qos == 1 {
        m.insert("acked".into(), json!(total.ok));
    }
    if let Some(rate) = a.send.rate {
        m.insert("target_rate".into(), json!(rate));
    }
    total.error = total.error.or(first_error);
    total.report("failures", "puback_", &mut m);
    util::emit(m);
    Ok(())
}

struct Job {
    /// Published to in turn (one topic unless a gateway's devices).
    topics: Vec<Vec<u8>>,
    size: usize,
    quota: u64,
    deadline: Option<Instant>,
    rate: Option<f64>,
    start: Instant,
    window: usize,
    drain: Duration,
}

impl Job {
    /// The topic of the `n`th message.
    fn topic(&self, n: u64) -> &[u8] {
        &self.topics[(n % self.topics.len() as u64) as usize]
    }

    /// How many to send in the next batch (up to `max`), after waiting for the pace;
    /// 0 when done.
    async fn next_batch(&self, sent: u64, max: u64) -> u64 {
        loop {
            if sent >= self.quota || self.deadline.is_some_and(|d| Instant::now() >= d) {
                return 0;
            }
            let left = self.quota - sent;
            match self.rate {
                None => return left.min(max),
                Some(r) => {
                    let due = (self.start.elapsed().as_secs_f64() * r) as u64 + 1;
                    if due > sent {
                        return (due - sent).min(left).min(max);
                    }
                    let at = self.start + Duration::from_secs_f64(sent as f64 / r);
                    let at = self.deadline.map_or(at, |d| at.min(d));
                    tokio::time::sleep_until(at.into()).await;
                }
            }
        }
    }
}

async fn publish_qos0(
    mut reader: Reader<OwnedReadHalf>,
    mut writer: OwnedWriteHalf,
    job: Job,
) -> Stats {
    // The reader only watches for the end of the connection and PINGRESP.
    let closed = Arc::new(AtomicBool::new(false));
    let pong = Arc::new(Notify::new());
    let watcher = {
        let (closed, pong) = (closed.clone(), pong.clone());
        tokio::spawn(async move {
            while let Ok(Some(p)) = reader.next().await {
                if p.kind() == mqtt::PINGRESP {
                    pong.notify_one();
                }
            }
            closed.store(true, Relaxed);
            pong.notify_one();
        })
    };
    let mut s = Stats::default();
    let mut msg = util::payload(job.size);
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let batch = job.next_batch(s.sent, 64).await;
        if batch == 0 {
            break;
        }
        if closed.load(Relaxed) {
            s.fail("connection closed by the server");
            break;
        }
        for j in 0..batch {
            util::stamp(&mut msg);
            mqtt::publish(&mut out, job.topic(s.sent + j), 0, 0, &msg);
        }
        if let Err(e) = writer.write_all(&out).await {
            s.fail(format!("write: {e}"));
            break;
        }
        out.clear();
        s.sent += batch;
    }
    // A PINGREQ round trip: the server has read every PUBLISH before it answers, so
    // the publisher's time covers the server taking them in, not just socket buffers.
    if s.error.is_none() {
        mqtt::pingreq(&mut out);
        if writer.write_all(&out).await.is_ok() {
            let _ = tokio::time::timeout(job.drain, pong.notified()).await;
        }
        s.finished = Some(Instant::now());
        out.clear();
        mqtt::disconnect(&mut out);
        let _ = writer.write_all(&out).await;
    }
    s.finished.get_or_insert_with(Instant::now);
    let _ = writer.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), watcher).await;
    s
}

async fn publish_qos1(
    mut reader: Reader<OwnedReadHalf>,
    mut writer: OwnedWriteHalf,
    job: Job,
) -> Stats {
    let window = Arc::new(Semaphore::new(job.window));
    let sent_at: Arc<Vec<AtomicU64>> =
        Arc::new((0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect());
    let total = Arc::new(AtomicU64::new(u64::MAX));
    let done = Arc::new(Notify::new());
    let acker = {
        let (window, sent_at, total, done) =
            (window.clone(), sent_at.clone(), total.clone(), done.clone());
        tokio::spawn(async move {
            let mut lat = Latencies::with_capacity(1 << 16);
            let mut acked = 0u64;
            let mut error = None;
            while acked < total.load(Relaxed) {
                let p = tokio::select! {
                    p = reader.next() => p,
                    _ = done.notified() => continue,
                };
                match p {
                    Ok(Some(p)) if p.kind() == mqtt::PUBACK => {
                        let t = sent_at[p.packet_id() as usize].swap(0, Relaxed);
                        if t != 0 {
                            lat.record_since(t);
                            acked += 1;
                            window.add_permits(1);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        error = Some("connection closed by the server".to_string());
                        break;
                    }
                    Err(e) => {
                        error = Some(format!("read: {e}"));
                        break;
                    }
                }
            }
            window.close();
            (acked, lat, error, Instant::now(), reader)
        })
    };
    let mut s = Stats::default();
    let mut msg = util::payload(job.size);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut id: u16 = 0;
    'outer: loop {
        let batch = job.next_batch(s.sent, job.window as u64).await;
        if batch == 0 {
            break;
        }
        // Wait for one slot, then take whatever else is free (up to the batch).
        let mut n = 0;
        while n < batch {
            let permit = if n == 0 {
                window.acquire().await.map_err(|_| ())
            } else {
                window.try_acquire().map_err(|_| ())
            };
            match permit {
                Ok(p) => p.forget(),
                Err(()) if n == 0 => break 'outer,
                Err(()) => break,
            }
            id = id.wrapping_add(1).max(1);
            let now = util::now_ns();
            msg[..8].copy_from_slice(&now.to_be_bytes());
            sent_at[id as usize].store(now, Relaxed);
            mqtt::publish(&mut out, job.topic(s.sent + n), 1, id, &msg);
            n += 1;
        }
        if let Err(e) = writer.write_all(&out).await {
            s.fail(format!("write: {e}"));
            break;
        }
        out.clear();
        s.sent += n;
    }
    total.store(s.sent, Relaxed);
    done.notify_one();
    match tokio::time::timeout(job.drain, acker).await {
        Ok(Ok((acked, lat, error, finished, _reader))) => {
            s.ok = acked;
            s.lat = lat;
            s.finished = Some(finished);
            if let Some(e) = error {
                s.fail(e);
            }
        }
        _ => {
            s.fail("PUBACKs missing at the end");
            s.finished = Some(Instant::now());
        }
    }
    s.errors += s.sent - s.ok.min(s.sent);
    mqtt::disconnect(&mut out);
    let _ = writer.write_all(&out).await;
    let _ = writer.shutdown().await;
    s
}

// ---------------------------------------------------------------------------------------
// mqtt-sub

#[derive(Args, Debug)]
pub struct SubArgs {
    #[command(flatten)]
    pub target: Target,
    /// Topic filter.
    #[arg(long, default_value = "telemetry")]
    pub filter: String,
    /// Subscription QoS 0 or 1.
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    /// Subscriber connections (more than one: a shared subscription `$share/lg/FILTER`).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    #[command(flatten)]
    pub until: util::Until,
}

pub async fn run_sub(a: SubArgs) -> Result<()> {
    let client = Arc::new(Client::new(&a.target)?);
    let (conns, failed, first) = client.open_many(a.connections, 16).await;
    if failed > 0 {
        return Err(format!(
            "{failed} subscriber connections failed: {}",
            first.unwrap_or_default()
        )
        .into());
    }
    let filter =
        if a.connections > 1 { format!("$share/lg/{}", a.filter) } else { a.filter.clone() };
    let collector = Arc::new(Collector::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (mut reader, mut writer) in conns {
        let granted = reader.subscribe_and_wait(&mut writer, &filter, a.qos).await?;
        if granted > 1 {
            return Err(format!("SUBSCRIBE {filter} refused ({granted:#04x})").into());
        }
        let (collector, mut stop) = (collector.clone(), stop_rx.clone());
        let keepalive = Duration::from_secs(a.target.keepalive.max(2) as u64 / 2);
        tasks.push(tokio::spawn(async move {
            let mut batch = LocalBatch::default();
            let mut out = BytesMut::with_capacity(4096);
            let mut ping =
                tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
            let mut flush = tokio::time::interval(Duration::from_millis(10));
            loop {
                loop {
                    match reader.try_next() {
                        Ok(Some(p)) if p.kind() == mqtt::PUBLISH => match p.publish() {
                            Ok(publish) => {
                                if publish.qos == 1 {
                                    mqtt::puback(&mut out, publish.packet_id);
                                }
                                if !batch.message(&publish.payload) {
                                    collector.skipped.fetch_add(1, Relaxed);
                                }
                            }
                            Err(_) => {
                                collector.errors.fetch_add(1, Relaxed);
                            }
                        },
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => {
                            collector.errors.fetch_add(1, Relaxed);
                            collector.flush(&mut batch);
                            return;
                        }
                    }
                }
                if !out.is_empty() {
                    if writer.write_all(&out).await.is_err() {
                        collector.errors.fetch_add(1, Relaxed);
                        break;
                    }
                    out.clear();
                }
                if batch.len() >= 4096 {
                    collector.flush(&mut batch);
                }
                tokio::select! {
                    n = reader.fill() => if !matches!(n, Ok(n) if n > 0) { break },
                    _ = flush.tick() => collector.flush(&mut batch),
                    _ = ping.tick() => {
                        mqtt::pingreq(&mut out);
                        if writer.write_all(&out).await.is_err() { break }
                        out.clear();
                    }
                    _ = stop.changed() => break,
                }
            }
            collector.flush(&mut batch);
            mqtt::disconnect(&mut out);
            let _ = writer.write_all(&out).await;
        }));
    }
    let end = a.until.wait(&collector, "subscribed").await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let mut m = collector.report("mqtt-sub", a.until.expect, end);
    m.insert("qos".into(), json!(a.qos));
    util::emit(m);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// idle

#[derive(Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub target: Target,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 200)]
    pub parallel: usize,
}

pub async fn run_idle(a: IdleArgs) -> Result<()> {
    let limit = util::raise_nofile(1 << 20);
    if (limit as usize) < a.connections + 100 {
        eprintln!("warning: RLIMIT_NOFILE {limit} is below {} connections", a.connections);
    }
    let client = Arc::new(Client::new(&a.target)?);
    let sem = Arc::new(Semaphore::new(a.parallel.max(1)));
    let dropped = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let all_done = Arc::new(Notify::new());
    let keepalive = Duration::from_secs(a.target.keepalive.max(2) as u64 / 2);
    let start = Instant::now();
    let n = a.connections;
    let finished = Arc::new(AtomicU64::new(0));
    for i in 0..n {
        let (client, sem, dropped, failed, connected, first_error, all_done, finished) = (
            client.clone(),
            sem.clone(),
            dropped.clone(),
            failed.clone(),
            connected.clone(),
            first_error.clone(),
            all_done.clone(),
            finished.clone(),
        );
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let opened = client.open_as(i, i, "", true).await;
            drop(permit);
            let conn = match opened {
                Ok(c) => {
                    connected.fetch_add(1, Relaxed);
                    Some(c)
                }
                Err(e) => {
                    failed.fetch_add(1, Relaxed);
                    first_error.lock().unwrap().get_or_insert(e.to_string());
                    None
                }
            };
            if finished.fetch_add(1, Relaxed) + 1 == n as u64 {
                all_done.notify_one();
            }
            let Some((mut reader, mut writer)) = conn else { return };
            let mut out = BytesMut::with_capacity(2);
            loop {
                tokio::select! {
                    p = reader.next() => match p {
                        Ok(Some(_)) => {}
                        _ => {
                            dropped.fetch_add(1, Relaxed);
                            return;
                        }
                    },
                    _ = tokio::time::sleep(keepalive) => {
                        mqtt::pingreq(&mut out);
                        if writer.write_all(&out).await.is_err() {
                            dropped.fetch_add(1, Relaxed);
                            return;
                        }
                        out.clear();
                    }
                }
            }
        });
    }
    if n > 0 {
        all_done.notified().await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ok = connected.load(Relaxed);
    let mut m = util::base("idle", ok, seconds, failed.load(Relaxed));
    m.insert("connections".into(), json!(ok));
    m.insert("failed".into(), json!(failed.load(Relaxed)));
    m.insert("dropped".into(), json!(dropped.load(Relaxed)));
    m.insert("nofile_limit".into(), json!(limit));
    if let Some(e) = first_error.lock().unwrap().clone() {
        m.insert("first_error".into(), json!(e));
    }
    util::emit(m);
    util::until_stopped().await;
    eprintln!(
        "{}",
        json!({"kind": "idle-end", "held": ok, "dropped": dropped.load(Relaxed), "seconds": util::round3(start.elapsed().as_secs_f64())})
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// connect-storm

#[derive(Args, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub target: Target,
    /// Concurrent workers, each connecting and disconnecting in a loop.
    #[arg(long, default_value_t = 32)]
    pub workers: usize,
    #[command(flatten)]
    pub amount: util::Amount<20_000>,
    /// First connect every device once (the cold pass, timed separately).
    #[arg(long)]
    pub warm: bool,
}

async fn storm_once(client: &Client, worker: usize, k: u64, device: usize, s: &mut Stats) {
    let t0 = Instant::now();
    match client.open_as(worker, device, &format!("-{k}"), true).await {
        Ok((_reader, mut writer)) => {
            s.lat.record(t0.elapsed());
            s.ok += 1;
            let mut out = BytesMut::with_capacity(2);
            mqtt::disconnect(&mut out);
            let _ = writer.write_all(&out).await;
            let _ = writer.shutdown().await;
        }
        Err(e) => {
            s.errors += 1;
            let e = e.to_string();
            let key = if e.starts_with("CONNACK") {
                e
            } else {
                e.split(':').next().unwrap_or("error").to_string()
            };
            s.count(key);
        }
    }
}

async fn storm(
    client: &Arc<Client>,
    workers: usize,
    count: u64,
    deadline: Option<Instant>,
    devices: usize,
    offset: u64,
) -> (Stats, f64) {
    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = Stats::default();
            loop {
                let k = next.fetch_add(1, Relaxed);
                if deadline.is_none() && k >= count || deadline.is_some_and(|d| Instant::now() >= d)
                {
                    break;
                }
                let device = ((k + offset) % devices.max(1) as u64) as usize;
                storm_once(&client, w, k + offset, device, &mut s).await;
            }
            s
        }));
    }
    (util::join_all(tasks).await, start.elapsed().as_secs_f64())
}

pub async fn run_storm(a: StormArgs) -> Result<()> {
    util::raise_nofile(1 << 20);
    let client = Arc::new(Client::new(&a.target)?);
    let devices = if a.target.devices > 0 { a.target.devices } else { a.workers };
    let mut cold = None;
    if a.warm {
        let (s, secs) =
            storm(&client, a.workers.min(devices), devices as u64, None, devices, 0).await;
        cold = Some((s, secs));
    }
    let deadline = a.amount.deadline(Instant::now());
    let (s, seconds) = storm(&client, a.workers, a.amount.count, deadline, devices, 1 << 32).await;
    let mut m = util::base("connect-storm", s.ok, seconds, s.errors);
    m.insert("connects_per_s".into(), m["msgs_per_s"].clone());
    m.insert("workers".into(), json!(a.workers));
    m.insert("devices".into(), json!(devices));
    s.report("failures", "connack_", &mut m);
    if let Some((c, secs)) = cold {
        m.insert("cold_connects".into(), json!(c.ok));
        m.insert("cold_failed".into(), json!(c.errors));
        m.insert("cold_seconds".into(), json!(util::round3(secs)));
        m.insert("cold_connects_per_s".into(), json!(util::per_s(c.ok, secs)));
        if !c.codes.is_empty() {
            m.insert("cold_failures".into(), json!(c.codes));
        }
    }
    util::emit(m);
    Ok(())
}
