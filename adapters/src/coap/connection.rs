//! The sockets: the plain UDP loop, and the DTLS listener that demultiplexes one UDP
//! socket into per-peer DTLS sessions (OpenSSL does the record layer and handshake, behind
//! the stateless cookie exchange and the checks of `dtls.rs` and `dtls_front.rs`).
//!
//! Neither loop ever waits for the registry or the messaging core: each request is
//! checked against its session's exchanges and then processed in its own task, bounded
//! by the adapter-wide in-flight semaphore and the per-peer limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{CoapOption, MessageType, Packet};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handler::{Failure, Handled, Poll, Shared};
use super::session::{
    Admission, Assembled, Assemblies, Confirmations, ExchangeKey, Exchanges, Session,
    EXCHANGE_LIFETIME,
};
use super::{dtls, dtls_front, mapping};
use crate::downstream::UploadError;

/// Largest UDP datagram; one such buffer per socket loop.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams queued for one DTLS peer before further ones are dropped (UDP semantics).
const PEER_QUEUE: usize = 32;
/// Room for the CoAP header, token and options on top of the payload.
const HEADER_ROOM: usize = 1024;
/// Pause after a failed receive.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_millis(1);
/// A CON request still waiting for a command after this long gets an empty ACK, and
/// the answer comes later as a separate CON response (RFC 7252 §5.2.2). Well under
/// ACK_TIMEOUT (2 s), so the client does not retransmit in between.
const SEPARATE_RESPONSE_AFTER: Duration = Duration::from_millis(1500);
/// RFC 7252 §4.8 defaults for our separate CON responses.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_RETRANSMIT: u32 = 4;

/// What one datagram is, before deduplication.
#[derive(Debug)]
pub(crate) enum Inbound {
    Request(Packet),
    /// Answer with this at once (a Reset).
    Reply(Bytes),
    /// An ACK or RST: the peer's answer to one of our CON messages.
    Answer {
        message_id: u16,
        acknowledged: bool,
    },
    /// Silently ignore (RFC 7252 §4.2, §4.3).
    Drop,
}

/// Classifies a datagram. Malformed CONs get a Reset, as RFC 7252 §4.2 asks; anything
/// else that is not a request is dropped, so garbage never costs more than this.
pub(crate) fn classify(datagram: &[u8]) -> Inbound {
    // Header: Ver(2) T(2) TKL(4) | Code | Message ID (16), RFC 7252 §3.
    let [first, code, id_hi, id_lo, ..] = *datagram else { return Inbound::Drop };
    if first >> 6 != 1 {
        return Inbound::Drop; // unknown version: silently ignored
    }
    let kind = (first >> 4) & 0b11;
    let message_id = u16::from_be_bytes([id_hi, id_lo]);
    let reject = || if kind == 0 { Inbound::Reply(reset(message_id)) } else { Inbound::Drop };
    match kind {
        // ACK and RST: only separate responses (our CONs) wait for them.
        2 | 3 => Inbound::Answer { message_id, acknowledged: kind == 2 },
        // Empty CON = CoAP ping, answered by a Reset (§4.3); responses or reserved
        // classes where a request belongs are rejected the same way.
        _ if code == 0 || code >> 5 != 0 => reject(),
        // Bounded before coap-lite allocates a node per option (a 60 KB datagram can
        // carry 60,000 empty ones).
        _ if !options_within_bounds(datagram) => {
            metrics::counter!("ferrule_coap_refused_total", "reason" => "options").increment(1);
            reject()
        }
        _ => match Packet::from_bytes(datagram) {
            Ok(packet) if marker_without_payload(&packet, datagram) => reject(),
            Ok(packet) => Inbound::Request(packet),
            Err(_) => reject(),
        },
    }
}

/// Most options in one request: a Hono request needs fewer than a dozen (Uri-Path and
/// Uri-Query segments, Content-Format, Block1, Size1, Accept).
pub(crate) const MAX_OPTIONS: usize = 32;
/// Most bytes of option values in one request.
pub(crate) const MAX_OPTION_BYTES: usize = 2048;

/// Counts the options of a request without parsing them (RFC 7252 §3.1): false when
/// there are more than [`MAX_OPTIONS`] or their values exceed [`MAX_OPTION_BYTES`], or
/// the options are malformed (coap-lite refuses those too).
fn options_within_bounds(datagram: &[u8]) -> bool {
    let token_length = (datagram[0] & 0x0f) as usize;
    let mut pos = 4 + token_length;
    let (mut count, mut bytes) = (0usize, 0usize);
    while let Some(&byte) = datagram.get(pos) {
        if byte == 0xff {
            break;
        }
        pos += 1;
        let mut extended = |nibble: u8| -> Option<usize> {
            match nibble {
                0..=12 => Some(nibble as usize),
                13 => {
                    let value = *datagram.get(pos)? as usize + 13;
                    pos += 1;
                    Some(value)
                }
                14 => {
                    let value = u16::from_be_bytes([*datagram.get(pos)?, *datagram.get(pos + 1)?])
                        as usize
                        + 269;
                    pos += 2;
                    Some(value)
                }
                _ => None,
            }
        };
        let (Some(_delta), Some(length)) = (extended(byte >> 4), extended(byte & 0x0f)) else {
            return false;
        };
        count += 1;
        bytes += length;
        pos += length;
        if count > MAX_OPTIONS || bytes > MAX_OPTION_BYTES || pos > datagram.len() {
            return false;
        }
    }
    true
}

/// A payload marker followed by nothing is a format error (RFC 7252 §3) that coap-lite
/// accepts as an empty payload. Only then does re-encoding come out shorter than what
/// arrived (coap-lite keeps options in wire order), so that is the test; it runs only for
/// empty payloads ending in 0xFF.
fn marker_without_payload(packet: &Packet, datagram: &[u8]) -> bool {
    packet.payload.is_empty()
        && datagram.last() == Some(&0xff)
        && packet.to_bytes_unlimited().is_ok_and(|encoded| encoded.len() < datagram.len())
}

/// An empty Reset for `message_id`: Ver 1, T = RST (3), TKL 0, Code 0.00.
fn reset(message_id: u16) -> Bytes {
    let [hi, lo] = message_id.to_be_bytes();
    Bytes::copy_from_slice(&[0x70, 0x00, hi, lo])
}

fn encode(packet: &Packet) -> Option<Bytes> {
    match packet.to_bytes() {
        Ok(bytes) => Some(Bytes::from(bytes)),
        Err(e) => {
            tracing::warn!(error = ?e, "cannot encode CoAP response");
            None
        }
    }
}

/// Where the answer to a request goes.
#[derive(Clone)]
enum Reply {
    Udp { socket: Arc<UdpSocket>, peer: SocketAddr, replies: Arc<ReplyBudget> },
    Dtls { session: Arc<dtls::Session>, socket: Arc<UdpSocket>, peer: SocketAddr },
}

impl Reply {
    async fn send(&self, bytes: &[u8]) {
        let result = match self {
            Reply::Udp { socket, peer, replies } => {
                if !replies.allow(peer.ip()) {
                    return;
                }
                socket.send_to(bytes, *peer).await.map(drop).map_err(|e| e.to_string())
            }
            Reply::Dtls { session, socket, peer } => {
                send_all(socket, *peer, session.seal(bytes)).await;
                Ok(())
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "cannot send CoAP response");
        }
    }
}

/// Handles one datagram of `session`; returns what to send at once (Reset, replayed
/// response, 5.03 when busy). Requests to process are spawned on `tasks`.
fn dispatch(
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    session: &Arc<Session>,
    peer: SocketAddr,
    reply: &Reply,
    datagram: &[u8],
) -> Option<Bytes> {
    let packet = match classify(datagram) {
        Inbound::Request(packet) => packet,
        Inbound::Reply(bytes) => return Some(bytes),
        Inbound::Drop => return None,
        Inbound::Answer { message_id, acknowledged } => {
            lock_confirmations(&session.confirmations)
                .resolve(ExchangeKey { peer, message_id }, acknowledged);
            return None;
        }
    };
    let key = ExchangeKey { peer, message_id: packet.header.message_id };
    let confirmable = packet.header.get_type() == MessageType::Confirmable;
    let now = Instant::now();
    let admission = lock(&session.exchanges).receive(key, confirmable, now);
    match admission {
        Admission::Ignore => return None,
        Admission::Replay(bytes) => return Some(bytes),
        Admission::PeerBusy => {
            return encode(&shared.failure_response(&packet, Failure::Overloaded))
        }
        Admission::New => {}
    }
    // Answered at once, and cached like any answer so a retransmission gets the same.
    let answer_now = |response: Packet| {
        let response = encode(&response);
        lock(&session.exchanges).complete(key, response.clone().filter(|_| confirmable));
        response
    };
    // Block-wise bodies are put together here; only whole requests go further. Without a
    // DTLS identity (plain CoAP), a body's first block is kept only once the target device
    // may upload unauthenticated (checked in the task below), so an anonymous peer cannot
    // make the adapter hold blocks for tenants that do not allow it.
    let (packet, last_block, unchecked_first) = match mapping::block1(&packet) {
        Err(e) => return answer_now(shared.failure_response(&packet, Failure::Mapping(e))),
        Ok(None) => (packet, None, None),
        Ok(Some(block)) if block.num == 0 && session.identity.is_none() => {
            (packet, None, Some(block))
        }
        Ok(Some(block)) => {
            match lock_assemblies(&session.assemblies).add(peer, &packet, block, now) {
                Assembled::Continue => return answer_now(shared.continue_response(&packet, block)),
                Assembled::TooLarge { size } => {
                    let failure = Failure::Upload(UploadError::TooLarge {
                        size,
                        max: shared.config.max_payload,
                    });
                    return answer_now(shared.failure_response(&packet, failure));
                }
                Assembled::Incomplete => {
                    return answer_now(shared.failure_response(&packet, Failure::BlockIncomplete))
                }
                Assembled::Complete(whole) => (whole, Some(block), None),
            }
        }
    };
    let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
        return answer_now(shared.failure_response(&packet, Failure::Overloaded));
    };
    let (shared, session, reply) = (shared.clone(), session.clone(), reply.clone());
    tasks.spawn(async move {
        let answer = async |response: Packet| {
            let response = encode(&response);
            lock(&session.exchanges).complete(key, response.clone().filter(|_| confirmable));
            if let Some(bytes) = response {
                reply.send(&bytes).await;
            }
        };
        let (packet, last_block) = match unchecked_first {
            None => (packet, last_block),
            Some(block) => {
                if let Err(failure) = shared.may_upload_unauthenticated(&packet).await {
                    tracing::debug!(?failure, "CoAP block-wise upload refused at its first block");
                    return answer(shared.failure_response(&packet, failure)).await;
                }
                let added =
                    lock_assemblies(&session.assemblies).add(peer, &packet, block, Instant::now());
                match added {
                    Assembled::Continue => {
                        return answer(shared.continue_response(&packet, block)).await
                    }
                    Assembled::TooLarge { size } => {
                        let failure = Failure::Upload(UploadError::TooLarge {
                            size,
                            max: shared.config.max_payload,
                        });
                        return answer(shared.failure_response(&packet, failure)).await;
                    }
                    Assembled::Incomplete => {
                        return answer(shared.failure_response(&packet, Failure::BlockIncomplete))
                            .await
                    }
                    Assembled::Complete(whole) => (whole, Some(block)),
                }
            }
        };
        // The final response names the final block (RFC 7959 §2.3).
        let finish = |mut response: Packet| {
            if let Some(block) = last_block {
                response.add_option(CoapOption::Block1, block.encode());
            }
            encode(&response)
        };
        match shared.handle(session.identity.as_ref(), packet).await {
            Handled::Done(response) => {
                let response = finish(response);
                lock(&session.exchanges).complete(key, response.clone().filter(|_| confirmable));
                if let Some(bytes) = response {
                    reply.send(&bytes).await;
                }
            }
            Handled::Poll(poll) => command_poll(&shared, &session, key, &reply, poll, finish).await,
        }
        drop(permit);
    });
    None
}

/// The wait for a command after an accepted upload with `hono-ttd`. A NON request, or
/// a CON whose command comes quickly, gets it piggy-backed; a CON still waiting after
/// [`SEPARATE_RESPONSE_AFTER`] gets an empty ACK now and the answer as a separate CON,
/// retransmitted until the device acknowledges it. The command is `accepted` once the
/// answer carrying it went out (piggy-backed / NON; a lost one is replayed from the
/// exchange cache when the device retransmits) or the device acknowledged it (separate).
async fn command_poll(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    key: ExchangeKey,
    reply: &Reply,
    poll: Poll,
    finish: impl Fn(Packet) -> Option<Bytes>,
) {
    let confirmable = poll.confirmable();
    let waiting = shared.wait_for_command(&poll);
    let mut waiting = std::pin::pin!(waiting);
    let early = if confirmable {
        tokio::select! {
            done = &mut waiting => Some(done),
            _ = tokio::time::sleep(SEPARATE_RESPONSE_AFTER) => None,
        }
    } else {
        Some(waiting.as_mut().await)
    };
    if let Some((response, confirmation)) = early {
        let response = finish(response);
        lock(&session.exchanges).complete(key, response.clone().filter(|_| confirmable));
        if let Some(bytes) = response {
            reply.send(&bytes).await;
            if let Some(confirmation) = confirmation {
                confirmation.accepted();
            }
        }
        return;
    }
    // Empty ACK (RFC 7252 §5.2.2), replayed to retransmissions of the request.
    let ack = empty_ack(key.message_id);
    lock(&session.exchanges).complete(key, Some(ack.clone()));
    reply.send(&ack).await;
    let (mut response, confirmation) = waiting.await;
    response.header.set_type(MessageType::Confirmable);
    response.header.message_id = shared.message_id();
    let con = ExchangeKey { peer: key.peer, message_id: response.header.message_id };
    let Some(bytes) = finish(response) else { return };
    let mut answered = lock_confirmations(&session.confirmations).expect(con);
    // Cancel safety of the loop: `answered` and the timer are polled by reference and
    // lose nothing when the other branch wins.
    let mut timeout = ACK_TIMEOUT;
    let mut acknowledged = false;
    for _ in 0..=MAX_RETRANSMIT {
        reply.send(&bytes).await;
        tokio::select! {
            answer = &mut answered => {
                acknowledged = answer.unwrap_or(false);
                break;
            }
            _ = tokio::time::sleep(timeout) => timeout *= 2,
            // Shutting down: give up; the command is released.
            _ = shared.stopping.cancelled() => break,
        }
    }
    lock_confirmations(&session.confirmations).forget(con);
    if acknowledged {
        if let Some(confirmation) = confirmation {
            confirmation.accepted();
        }
    } else {
        tracing::debug!(peer = %key.peer, "separate CoAP response not acknowledged; command released");
    }
}

/// An empty ACK for `message_id`: Ver 1, T = ACK (2), TKL 0, Code 0.00.
fn empty_ack(message_id: u16) -> Bytes {
    let [hi, lo] = message_id.to_be_bytes();
    Bytes::copy_from_slice(&[0x60, 0x00, hi, lo])
}

fn lock_confirmations(
    confirmations: &Mutex<Confirmations>,
) -> std::sync::MutexGuard<'_, Confirmations> {
    confirmations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Like [`lock`]: short critical sections, consistent data even if poisoned.
fn lock_assemblies(assemblies: &Mutex<Assemblies>) -> std::sync::MutexGuard<'_, Assemblies> {
    assemblies.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The exchanges' lock is held for a few map operations only; a poisoned one still
/// holds consistent data (no code panics while holding it), so keep serving.
fn lock(exchanges: &Mutex<Exchanges>) -> std::sync::MutexGuard<'_, Exchanges> {
    exchanges.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Answers per source address on plain UDP: a token bucket, so that the endpoint cannot
/// be used to reflect traffic at a spoofed victim faster than `rate` answers a second
/// (answers are a few times larger than the smallest requests). The table of sources is
/// bounded; sources over the bound share one bucket.
pub(crate) struct ReplyBudget {
    rate: f64,
    buckets: Mutex<HashMap<std::net::IpAddr, (f64, Instant)>>,
}

/// Sources tracked by a [`ReplyBudget`].
const MAX_REPLY_SOURCES: usize = 65_536;

impl ReplyBudget {
    pub(crate) fn new(rate: u32) -> Self {
        Self { rate: rate.max(1) as f64, buckets: Mutex::default() }
    }

    /// Takes one answer from `ip`'s budget; false (and counted) when it is spent.
    pub(crate) fn allow(&self, ip: std::net::IpAddr) -> bool {
        let now = Instant::now();
        let burst = self.rate * 2.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_REPLY_SOURCES && !buckets.contains_key(&ip) {
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * self.rate < burst
            });
        }
        let key = if buckets.len() >= MAX_REPLY_SOURCES && !buckets.contains_key(&ip) {
            std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        } else {
            ip
        };
        let (tokens, at) = buckets.entry(key).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(burst);
        *at = now;
        if *tokens < 1.0 {
            metrics::counter!("ferrule_coap_refused_total", "reason" => "reply_rate").increment(1);
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

/// The plain UDP endpoint: unauthenticated devices only.
pub(super) async fn serve_udp(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let config = &shared.config;
    let exchanges =
        Exchanges::new(EXCHANGE_LIFETIME, config.max_exchanges, config.max_in_flight_per_peer);
    let assemblies =
        Assemblies::new(EXCHANGE_LIFETIME, config.max_block_transfers, config.max_payload);
    let session = Arc::new(Session {
        identity: None,
        exchanges: Mutex::new(exchanges),
        assemblies: Mutex::new(assemblies),
        confirmations: Mutex::default(),
    });
    let replies = Arc::new(ReplyBudget::new(shared.config.reply_rate_per_ip));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // Cancel safety: `recv_from` loses nothing when cancelled.
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    // Transient (an ICMP error of an earlier send); the pause only keeps a
                    // persistent failure from spinning.
                    tracing::debug!(error = %e, "CoAP UDP receive failed");
                    tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let reply = Reply::Udp { socket: socket.clone(), peer, replies: replies.clone() };
        if let Some(bytes) = dispatch(&shared, &tasks, &session, peer, &reply, &buf[..n])
            .filter(|_| replies.allow(peer.ip()))
        {
            // Never wait in the receive loop: a full socket buffer drops the answer,
            // as the network might, and the peer retransmits.
            if let Err(e) = socket.try_send_to(&bytes, peer) {
                tracing::debug!(%peer, error = %e, "cannot send CoAP answer");
            }
        }
    }
}

/// The DTLS endpoint: one UDP socket, demultiplexed by peer address into sessions.
///
/// Every datagram passes [`dtls_front::inspect`] first, and each session has a budget of
/// handshake records, so OpenSSL only ever sees whole, well-formed handshake
/// messages in small numbers (see `dtls_front.rs`). A ClientHello without a valid cookie
/// is answered statelessly (`dtls.rs`); one with a valid cookie from the address of an
/// established session starts a second, pending session beside it: the established one
/// keeps its application data until the new handshake completes (RFC 6347 §4.2.8), so a
/// spoofed ClientHello cannot end a device's session. Handshaking sessions are capped
/// per source IP and in total.
pub(super) async fn serve_dtls(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let peers: Peers = Arc::default();
    let handshaking: Handshaking = Arc::default();
    let mut next_id = 0u64;
    let sessions = Arc::new(tokio::sync::Semaphore::new(shared.config.max_dtls_sessions.max(1)));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        // Cancel safety: `recv_from` loses nothing when cancelled.
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    tracing::debug!(error = %e, "CoAP DTLS receive failed");
                    tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let datagram = &buf[..n];
        let shape = match dtls_front::inspect(datagram) {
            Ok(shape) => shape,
            Err(refusal) => {
                dtls_dropped(refusal.as_str());
                continue;
            }
        };
        if shape.client_hello {
            // The stateless cookie exchange: no state for a ClientHello without a cookie
            // made for this address (a spoofed source never gets further).
            let Some(hello) = dtls::hello_fields(datagram) else {
                dtls_dropped("bad_handshake");
                continue;
            };
            if !shared.dtls.cookies().verify(peer, hello.cookie) {
                let answer =
                    dtls::hello_verify_request(&hello, &shared.dtls.cookies().cookie(peer));
                if let Err(e) = socket.try_send_to(&answer, peer) {
                    tracing::debug!(%peer, error = %e, "cannot send HelloVerifyRequest");
                }
                continue;
            }
        }
        let route = {
            let mut peers = lock_peers(&peers);
            let entry = peers.entry(peer).or_default();
            entry.promote();
            let route = entry.route(shape);
            if !matches!(route, Route::NewSession) && entry.is_empty() {
                peers.remove(&peer);
            }
            route
        };
        match route {
            Route::Session(queue) => {
                // Full queue: the peer sends faster than its session reads; drop, as UDP may.
                let _ = queue.try_send(Bytes::copy_from_slice(datagram));
                continue;
            }
            Route::Drop(reason) => {
                dtls_dropped(reason);
                continue;
            }
            Route::NewSession => {}
        }
        let admitted =
            HandshakeSlot::take(&handshaking, peer.ip(), shared.config.max_dtls_handshakes_per_ip)
                .ok_or("handshakes_per_ip")
                .and_then(|slot| {
                    sessions
                        .clone()
                        .try_acquire_owned()
                        .map(|permit| (slot, permit))
                        .map_err(|_| "sessions")
                });
        let (slot, permit) = match admitted {
            Ok(admitted) => admitted,
            Err(reason) => {
                dtls_dropped(reason);
                forget_if_empty(&peers, peer);
                continue;
            }
        };
        let (queue, inbox) = mpsc::channel(PEER_QUEUE);
        next_id += 1;
        let handle = SessionHandle {
            id: next_id,
            queue,
            established: Arc::default(),
            cancel: shutdown.child_token(),
            budget: dtls_front::HANDSHAKE_RECORD_BUDGET.saturating_sub(shape.handshake_records),
        };
        let (id, established, cancel) =
            (handle.id, handle.established.clone(), handle.cancel.clone());
        lock_peers(&peers).entry(peer).or_default().pending = Some(handle);
        let hello = Bytes::copy_from_slice(datagram);
        let link = PeerLink { socket: socket.clone(), peer, inbox };
        let (shared, peers, tasks2) = (shared.clone(), peers.clone(), tasks.clone());
        tasks.spawn(async move {
            run_session(link, hello, &shared, &tasks2, &cancel, &established, slot).await;
            // Only this session's handle: a newer one may have replaced it.
            let mut peers = lock_peers(&peers);
            if let Some(entry) = peers.get_mut(&peer) {
                entry.remove(id);
                if entry.is_empty() {
                    peers.remove(&peer);
                }
            }
            drop(permit);
        });
    }
}

/// One peer's side of the shared DTLS socket.
struct PeerLink {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    inbox: mpsc::Receiver<Bytes>,
}

async fn send_all(socket: &UdpSocket, peer: SocketAddr, datagrams: Vec<Vec<u8>>) {
    for datagram in datagrams {
        if let Err(error) = socket.send_to(&datagram, peer).await {
            tracing::debug!(%peer, %error, "cannot send a DTLS record");
        }
    }
}

fn dtls_dropped(reason: &'static str) {
    metrics::counter!("ferrule_coap_dtls_dropped_total", "reason" => reason).increment(1);
}

fn forget_if_empty(peers: &Peers, peer: SocketAddr) {
    let mut peers = lock_peers(peers);
    if peers.get(&peer).is_some_and(PeerEntry::is_empty) {
        peers.remove(&peer);
    }
}

/// The DTLS sessions by peer address.
type Peers = Arc<Mutex<HashMap<SocketAddr, PeerEntry>>>;

/// Handshaking sessions per source IP.
type Handshaking = Arc<Mutex<HashMap<std::net::IpAddr, usize>>>;

/// One handshaking session's place in the per-IP count, given back when dropped (the
/// handshake completed or failed).
struct HandshakeSlot {
    handshaking: Handshaking,
    ip: std::net::IpAddr,
}

impl HandshakeSlot {
    fn take(handshaking: &Handshaking, ip: std::net::IpAddr, max: usize) -> Option<Self> {
        let mut counts = handshaking.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Self { handshaking: handshaking.clone(), ip })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut counts = self.handshaking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What one peer address has: an established session, and a handshake in progress
/// (the first one, or a replacement for the established one).
#[derive(Default)]
struct PeerEntry {
    current: Option<SessionHandle>,
    pending: Option<SessionHandle>,
}

struct SessionHandle {
    /// Tells this session from a later one of the same address.
    id: u64,
    /// Datagrams for the session.
    queue: mpsc::Sender<Bytes>,
    /// The handshake completed.
    established: Arc<AtomicBool>,
    /// Ends the session (shutdown, or a newer session of the peer took over).
    cancel: CancellationToken,
    /// Handshake records it may still receive.
    budget: u32,
}

/// Where a datagram goes.
enum Route {
    Session(mpsc::Sender<Bytes>),
    NewSession,
    Drop(&'static str),
}

impl PeerEntry {
    /// A pending session whose handshake completed replaces the established one.
    fn promote(&mut self) {
        if self.pending.as_ref().is_some_and(|p| p.established.load(Ordering::Acquire)) {
            if let Some(old) = self.current.take() {
                old.cancel.cancel();
            }
            self.current = self.pending.take();
        }
    }

    fn route(&mut self, shape: dtls_front::Shape) -> Route {
        // Handshake traffic goes to the handshake in progress, within its budget; so
        // does everything else while there is no established session (a client's
        // first request may arrive before the handshake's end was noticed here: the
        // session's task handles it after the handshake, in order).
        if let Some(pending) = self.pending.as_mut() {
            if shape.plaintext_only || shape.handshake_records > 0 || self.current.is_none() {
                if shape.handshake_records > pending.budget {
                    return Route::Drop("handshake_budget");
                }
                pending.budget -= shape.handshake_records;
                return Route::Session(pending.queue.clone());
            }
        }
        if shape.client_hello {
            // A device starting over (reboot, new NAT mapping), or a spoof: the
            // established session, if any, stays until the new handshake completes.
            return Route::NewSession;
        }
        match self.current.as_mut() {
            // No renegotiation: an established session takes handshake
            // records only within its budget (retransmitted Finished flights).
            Some(current) if !shape.plaintext_only && shape.handshake_records <= current.budget => {
                current.budget -= shape.handshake_records;
                Route::Session(current.queue.clone())
            }
            Some(_) => Route::Drop("handshake_budget"),
            None => Route::Drop("no_session"),
        }
    }

    fn remove(&mut self, id: u64) {
        if self.current.as_ref().is_some_and(|c| c.id == id) {
            self.current = None;
        }
        if self.pending.as_ref().is_some_and(|p| p.id == id) {
            self.pending = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.current.is_none() && self.pending.is_none()
    }
}

fn lock_peers(peers: &Peers) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, PeerEntry>> {
    peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Handshake, then serve one DTLS session until it idles out, fails or is cancelled.
async fn run_session(
    mut link: PeerLink,
    hello: Bytes,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    established: &AtomicBool,
    slot: HandshakeSlot,
) {
    let peer = link.peer;
    let (mut handshake, flight) = match shared.dtls.start(peer, &hello) {
        Ok(started) => started,
        Err(error) => {
            tracing::debug!(%peer, %error, "DTLS handshake not started");
            return;
        }
    };
    send_all(&link.socket, peer, flight).await;
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let mut retransmit = tokio::time::interval(dtls::RETRANSMIT_INTERVAL);
    retransmit.tick().await;
    let session = loop {
        // Cancel safety: `recv` and the timers lose nothing when another branch wins.
        let datagram = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::debug!(%peer, "DTLS handshake timed out");
                return;
            }
            _ = retransmit.tick() => {
                send_all(&link.socket, peer, handshake.handle_timeout()).await;
                continue;
            }
            datagram = link.inbox.recv() => match datagram {
                Some(datagram) => datagram,
                None => return,
            },
        };
        if let Some(identity) = dtls_front::psk_identity(&datagram) {
            look_up_psk(shared, handshake.data(), identity).await;
        }
        match handshake.step(datagram) {
            Ok(dtls::Step::Continue(flight)) => send_all(&link.socket, peer, flight).await,
            Ok(dtls::Step::Established(session, flight)) => {
                send_all(&link.socket, peer, flight).await;
                break Arc::new(session);
            }
            Ok(dtls::Step::Failed(error, alert)) => {
                tracing::debug!(%peer, %error, "DTLS handshake failed");
                send_all(&link.socket, peer, alert).await;
                return;
            }
            Err(error) => {
                tracing::debug!(%peer, %error, "DTLS handshake failed");
                return;
            }
        }
    };
    drop(slot);
    established.store(true, Ordering::Release);
    let identity = session.identity.clone();
    tracing::debug!(%peer, tenant = %identity.tenant, device = %identity.device_id, "DTLS session up");
    let config = &shared.config;
    let exchanges = Exchanges::new(
        EXCHANGE_LIFETIME,
        config.max_exchanges_per_session,
        config.max_in_flight_per_peer,
    );
    let assemblies =
        Assemblies::new(EXCHANGE_LIFETIME, config.max_in_flight_per_peer, config.max_payload);
    let coap = Arc::new(Session {
        identity: Some(identity),
        exchanges: Mutex::new(exchanges),
        assemblies: Mutex::new(assemblies),
        confirmations: Mutex::default(),
    });
    let reply = Reply::Dtls { session: session.clone(), socket: link.socket.clone(), peer };
    let max_request = config.max_payload + HEADER_ROOM;
    loop {
        // Cancel safety: `recv` takes a datagram from a channel; cancelling it between
        // datagrams loses nothing.
        let datagram = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(config.session_idle_timeout) => {
                tracing::debug!(%peer, "DTLS session idle; closing");
                break;
            }
            datagram = link.inbox.recv() => match datagram {
                Some(datagram) => datagram,
                None => break,
            },
        };
        match session.receive(datagram, max_request) {
            dtls::Received::Data(requests, out) => {
                send_all(&link.socket, peer, out).await;
                for request in requests {
                    if let Some(bytes) = dispatch(shared, tasks, &coap, peer, &reply, &request) {
                        reply.send(&bytes).await;
                    }
                }
            }
            dtls::Received::Closed(out) => {
                send_all(&link.socket, peer, out).await;
                return;
            }
        }
    }
    send_all(&link.socket, peer, session.close()).await;
}

/// Looks the PSK identity `auth-id@tenant` of a ClientKeyExchange up in the registry,
/// for OpenSSL's (synchronous) PSK callback to find.
async fn look_up_psk(shared: &Arc<Shared>, data: &dtls::SessionData, identity: &[u8]) {
    let Some((auth_id, tenant)) = crate::door::split_auth_id_bytes(identity) else {
        tracing::debug!("PSK identity is not auth-id@tenant");
        return;
    };
    let lookup =
        tokio::time::timeout(shared.config.handshake_timeout, shared.registry.psk(tenant, auth_id));
    match lookup.await {
        Ok(Ok((device, key))) => {
            *data.psk.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((identity.to_vec(), key, device));
        }
        Ok(Err(e)) => tracing::debug!(auth_id, tenant, error = %e, "PSK identity refused"),
        Err(_) => tracing::debug!(auth_id, tenant, "registry did not answer in time"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_rate_limited_per_source() {
        let budget = ReplyBudget::new(10);
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let allowed = (0..100).filter(|_| budget.allow(a)).count();
        assert_eq!(allowed, 20, "a burst of twice the rate, then nothing");
        assert!(budget.allow(b), "another source has its own budget");
    }

    #[test]
    fn malformed_datagrams_are_reset_or_dropped() {
        assert!(matches!(classify(&[]), Inbound::Drop));
        assert!(matches!(classify(&[0x40, 0x02]), Inbound::Drop), "shorter than a header");
        // Version 2: silently ignored.
        assert!(matches!(classify(&[0x80, 0x02, 0x12, 0x34]), Inbound::Drop));
        // Empty CON (ping) → RST with the same message id.
        match classify(&[0x40, 0x00, 0x12, 0x34]) {
            Inbound::Reply(bytes) => assert_eq!(&bytes[..], &[0x70, 0x00, 0x12, 0x34]),
            other => panic!("{other:?}"),
        }
        // CON POST with TKL 9 (invalid) → RST; the same as NON → dropped.
        assert!(matches!(
            classify(&[0x49, 0x02, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
            Inbound::Reply(_)
        ));
        assert!(matches!(classify(&[0x59, 0x02, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]), Inbound::Drop));
        // CON POST with an option length nibble of 15 (reserved) → RST.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xbf]), Inbound::Reply(_)));
        // CON carrying a response code (2.04) → RST; ACK / RST → answers to our CONs.
        assert!(matches!(classify(&[0x40, 0x44, 0, 1]), Inbound::Reply(_)));
        assert!(matches!(
            classify(&[0x60, 0x00, 0, 7]),
            Inbound::Answer { message_id: 7, acknowledged: true }
        ));
        assert!(matches!(
            classify(&[0x70, 0x00, 1, 0]),
            Inbound::Answer { message_id: 256, acknowledged: false }
        ));
        // Too many options (the H1 bloat: thousands of empty ones) → RST before parsing.
        let mut bloated = vec![0x40, 0x02, 0, 1, 0xb1, b't'];
        bloated.extend(std::iter::repeat_n(0x00, MAX_OPTIONS));
        assert!(matches!(classify(&bloated), Inbound::Reply(_)));
        bloated.truncate(6 + MAX_OPTIONS - 1);
        assert!(matches!(classify(&bloated), Inbound::Request(_)));
        // Option values over the byte bound.
        let mut long = vec![0x40, 0x02, 0, 1, 0xbe];
        long.extend_from_slice(&((MAX_OPTION_BYTES + 1 - 269) as u16).to_be_bytes());
        long.extend(std::iter::repeat_n(b'a', MAX_OPTION_BYTES + 1));
        assert!(matches!(classify(&long), Inbound::Reply(_)));
        // CON POST /t (Uri-Path option 11, length 1) → a request.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xb1, b't']), Inbound::Request(_)));
        // ... but with a payload marker and no payload → RST.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xb1, b't', 0xff]), Inbound::Reply(_)));
        // An option whose value ends in 0xFF is not a payload marker.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xb1, 0xff]), Inbound::Request(_)));
    }
}
