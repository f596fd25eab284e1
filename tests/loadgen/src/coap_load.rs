//! CoAP over UDP load (`coap-pub`): each client is one UDP socket with a window of
//! outstanding requests, CON (answered by a piggy-backed ACK) or NON (answered by a
//! NON response, used here only for flow control).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use coap_lite::{CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType};
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::util::{self, Result, Stats};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Kind {
    Con,
    Non,
}

#[derive(Args, Debug)]
pub struct CoapArgs {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:5683")]
    pub host: String,
    /// Uri-Path (template, `{i}` = client index modulo --devices).
    #[arg(long, default_value = "/telemetry/bench/dev{i}")]
    pub path: String,
    /// Request method (put: the unauthenticated `/telemetry/TENANT/DEVICE` form).
    #[arg(long, default_value = "put")]
    pub method: String,
    /// Confirmable or non-confirmable requests.
    #[arg(long = "type", value_enum, default_value = "con")]
    pub kind: Kind,
    /// Clients (UDP sockets, i.e. distinct peers).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Number of distinct devices behind `{i}` (0: one per client).
    #[arg(long, default_value_t = 0)]
    pub devices: usize,
    /// Outstanding requests per client.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    #[command(flatten)]
    pub send: util::Sending<50_000>,
    /// A request without a response after this many milliseconds is counted lost.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Source addresses to spread the clients over.
    #[arg(long, default_value = "")]
    pub sources: String,
}

const SLOTS: usize = 4096;

struct Slots {
    sent_ns: Vec<AtomicU64>,
    seq: Vec<AtomicU32>,
}

/// The request as bytes, with a 4-byte token; returns (bytes, offset of the payload).
fn template(kind: Kind, method: RequestType, path: &str, size: usize) -> Result<(Vec<u8>, usize)> {
    let mut p = Packet::new();
    p.header.set_type(if kind == Kind::Con {
        MessageType::Confirmable
    } else {
        MessageType::NonConfirmable
    });
    p.header.code = MessageClass::Request(method);
    p.header.message_id = 0;
    p.set_token(vec![0, 0, 0, 0]);
    for seg in path.split('?').next().unwrap_or("").split('/').filter(|s| !s.is_empty()) {
        p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
    }
    if let Some(q) = path.split_once('?').map(|x| x.1) {
        for part in q.split('&') {
            p.add_option(CoapOption::UriQuery, part.as_bytes().to_vec());
        }
    }
    p.set_content_format(ContentFormat::ApplicationOctetStream);
    p.payload = util::payload(size);
    let bytes = p.to_bytes().map_err(|e| format!("encoding the CoAP request: {e:?}"))?;
    let at = bytes.len() - p.payload.len();
    Ok((bytes, at))
}

struct Job {
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    packet: Vec<u8>,
    payload_at: usize,
    window: usize,
    quota: u64,
    deadline: Option<Instant>,
    rate: Option<f64>,
    start: Instant,
    timeout: Duration,
}

async fn client(job: Job) -> Stats {
    let mut s = Stats::default();
    let bind = SocketAddr::new(
        job.source.unwrap_or(if job.addr.is_ipv4() {
            [0, 0, 0, 0].into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        }),
        0,
    );
    let socket = match UdpSocket::bind(bind).await {
        Ok(sock) => sock,
        Err(e) => {
            s.error = Some(format!("bind: {e}"));
            return s;
        }
    };
    if let Err(e) = socket.connect(job.addr).await {
        s.error = Some(format!("connect: {e}"));
        return s;
    }
    let socket = Arc::new(socket);
    let slots = Arc::new(Slots {
        sent_ns: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        seq: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
    });
    let window = Arc::new(Semaphore::new(job.window.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Responses.
    let receiver = {
        let (socket, slots, window, mut stop) =
            (socket.clone(), slots.clone(), window.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut r = Stats::default();
            let mut buf = vec![0u8; 2048];
            loop {
                let n = tokio::select! {
                    n = socket.recv(&mut buf) => match n { Ok(n) => n, Err(_) => continue },
                    _ = stop.changed() => break,
                };
                let Ok(p) = Packet::from_bytes(&buf[..n]) else { continue };
                let token = p.get_token();
                if token.len() != 4 {
                    continue;
                }
                if p.header.code == MessageClass::Empty {
                    continue; // an empty ACK: a separate response would follow
                }
                let seq = u32::from_be_bytes([token[0], token[1], token[2], token[3]]);
                let slot = seq as usize % SLOTS;
                if slots.seq[slot].load(Relaxed) != seq {
                    continue;
                }
                let t = slots.sent_ns[slot].swap(0, Relaxed);
                if t == 0 {
                    continue; // timed out already, or a duplicate
                }
                r.lat.record_since(t);
                match p.header.code {
                    MessageClass::Response(code) if !code.is_error() => r.ok += 1,
                    other => r.count(other.to_string()),
                }
                // A separate CON response would need our ACK; piggy-backed ones do not.
                if p.header.get_type() == MessageType::Confirmable {
                    let mut ack = Packet::new();
                    ack.header.set_type(MessageType::Acknowledgement);
                    ack.header.message_id = p.header.message_id;
                    if let Ok(b) = ack.to_bytes() {
                        let _ = socket.send(&b).await;
                    }
                }
                r.finished = Some(Instant::now());
                window.add_permits(1);
            }
            r
        })
    };
    // Timeouts: slots older than the timeout are given up.
    let sweeper = {
        let (slots, window, mut stop, timeout) =
            (slots.clone(), window.clone(), stop_rx.clone(), job.timeout);
        tokio::spawn(async move {
            let mut lost = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                let cutoff = util::now_ns().saturating_sub(timeout.as_nanos() as u64);
                for slot in slots.sent_ns.iter() {
                    let t = slot.load(Relaxed);
                    if t != 0 && t < cutoff && slot.compare_exchange(t, 0, Relaxed, Relaxed).is_ok()
                    {
                        lost += 1;
                        window.add_permits(1);
                    }
                }
            }
            lost
        })
    };

    let mut packet = job.packet.clone();
    let mut seq: u32 = 0;
    let mut mid: u16 = rand_start();
    loop {
        if s.sent >= job.quota || job.deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(r) = job.rate {
            let at = job.start + Duration::from_secs_f64(s.sent as f64 / r);
            if at > Instant::now() {
                tokio::time::sleep_until(at.into()).await;
            }
        }
        let Ok(permit) = window.acquire().await else { break };
        permit.forget();
        // A free slot (the one for this sequence number may still be outstanding).
        let slot = loop {
            seq = seq.wrapping_add(1);
            let slot = seq as usize % SLOTS;
            if slots.sent_ns[slot].load(Relaxed) == 0 {
                break slot;
            }
        };
        mid = mid.wrapping_add(1);
        packet[2..4].copy_from_slice(&mid.to_be_bytes());
        packet[4..8].copy_from_slice(&seq.to_be_bytes());
        let now = util::now_ns();
        packet[job.payload_at..job.payload_at + 8].copy_from_slice(&now.to_be_bytes());
        slots.seq[slot].store(seq, Relaxed);
        slots.sent_ns[slot].store(now, Relaxed);
        if let Err(e) = socket.send(&packet).await {
            slots.sent_ns[slot].store(0, Relaxed);
            window.add_permits(1);
            s.error.get_or_insert(format!("send: {e}"));
            s.count("send-error");
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        s.sent += 1;
    }
    // Wait for the outstanding responses (or their timeouts).
    let all = job.window.max(1) as u32;
    let _ =
        tokio::time::timeout(job.timeout + Duration::from_millis(200), window.acquire_many(all))
            .await;
    let _ = stop_tx.send(true);
    if let Ok(r) = receiver.await {
        s.merge(r);
    }
    s.timeouts = sweeper.await.unwrap_or(0);
    s
}

fn rand_start() -> u16 {
    (util::now_ns() as u16) ^ (std::process::id() as u16)
}

pub async fn run_pub(a: CoapArgs) -> Result<()> {
    let addr = util::resolve(&a.host)?;
    let sources = util::parse_sources(&a.sources)?;
    let method = match a.method.to_ascii_lowercase().as_str() {
        "put" => RequestType::Put,
        "post" => RequestType::Post,
        m => return Err(format!("method {m}: put or post").into()),
    };
    let n = a.clients.max(1);
    let start = Instant::now();
    let deadline = a.send.amount.deadline(start);
    let mut tasks = Vec::new();
    for i in 0..n {
        let d = util::device(i, a.devices);
        let (packet, payload_at) =
            template(a.kind, method, &util::expand(&a.path, d), a.send.size)?;
        tasks.push(tokio::spawn(client(Job {
            addr,
            source: util::spread(&sources, i),
            packet,
            payload_at,
            window: a.window,
            quota: a.send.amount.quota(n, i),
            deadline,
            rate: a.send.rate_of(n),
            start,
            timeout: Duration::from_millis(a.timeout_ms),
        })));
    }
    let total = util::join_all(tasks).await;
    let seconds = total.seconds_since(start);
    let errors = total.timeouts + total.codes.values().sum::<u64>();
    let mut m = util::base("coap-pub", total.sent, seconds, errors);
    m.insert("type".into(), json!(if a.kind == Kind::Con { "con" } else { "non" }));
    m.insert("ok".into(), json!(total.ok));
    m.insert("msgs_per_s".into(), json!(util::per_s(total.ok, seconds)));
    m.insert("sent_per_s".into(), json!(util::per_s(total.sent, seconds)));
    m.insert("timeouts".into(), json!(total.timeouts));
    m.insert("clients".into(), json!(n));
    total.report("codes", "", &mut m);
    util::emit(m);
    Ok(())
}
