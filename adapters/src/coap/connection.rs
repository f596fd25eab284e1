//! The sockets: the plain UDP loop, and the DTLS listener that demultiplexes one UDP
//! socket into per-peer DTLS sessions (webrtc-dtls does the record layer and handshake).
//!
//! Neither loop ever waits for the registry or the messaging core: each request is
//! checked against its session's exchanges and then processed in its own task, bounded
//! by the adapter-wide in-flight semaphore and the per-peer limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use coap_lite::{CoapOption, MessageType, Packet};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use webrtc_dtls::conn::DTLSConn;

use super::session::{
    Admission, Assembled, Assemblies, Confirmations, ExchangeKey, Exchanges, Session, EXCHANGE_LIFETIME,
};
use super::{dtls_front, mapping, Failure, Handled, Poll, Shared};
use crate::device::DeviceIdentity;
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
    Answer { message_id: u16, acknowledged: bool },
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
        _ if !options_within_bounds(datagram) => reject(),
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
                    let value = u16::from_be_bytes([*datagram.get(pos)?, *datagram.get(pos + 1)?]) as usize + 269;
                    pos += 2;
                    Some(value)
                }
                _ => None,
            }
        };
        let (Some(_delta), Some(length)) = (extended(byte >> 4), extended(byte & 0x0f)) else { return false };
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
    Udp { socket: Arc<UdpSocket>, peer: SocketAddr },
    Dtls(Arc<DTLSConn>),
}

impl Reply {
    async fn send(&self, bytes: &[u8]) {
        let result = match self {
            Reply::Udp { socket, peer } => socket.send_to(bytes, *peer).await.map(drop).map_err(|e| e.to_string()),
            Reply::Dtls(conn) => conn.write(bytes, None).await.map(drop).map_err(|e| e.to_string()),
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
            lock_confirmations(&session.confirmations).resolve(ExchangeKey { peer, message_id }, acknowledged);
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
        Admission::PeerBusy => return encode(&shared.failure_response(&packet, Failure::Overloaded)),
        Admission::New => {}
    }
    // Answered at once, and cached like any answer so a retransmission gets the same.
    let answer_now = |response: Packet| {
        let response = encode(&response);
        lock(&session.exchanges).complete(key, response.clone().filter(|_| confirmable));
        response
    };
    // Block-wise bodies are put together here; only whole requests go further.
    let (packet, last_block) = match mapping::block1(&packet) {
        Err(e) => return answer_now(shared.failure_response(&packet, Failure::Mapping(e))),
        Ok(None) => (packet, None),
        Ok(Some(block)) => match lock_assemblies(&session.assemblies).add(peer, &packet, block, now) {
            Assembled::Continue => return answer_now(shared.continue_response(&packet, block)),
            Assembled::TooLarge { size } => {
                let failure = Failure::Upload(UploadError::TooLarge { size, max: shared.config.max_payload });
                return answer_now(shared.failure_response(&packet, failure));
            }
            Assembled::Incomplete => return answer_now(shared.failure_response(&packet, Failure::BlockIncomplete)),
            Assembled::Complete(whole) => (whole, Some(block)),
        },
    };
    let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
        return answer_now(shared.failure_response(&packet, Failure::Overloaded));
    };
    let (shared, session, reply) = (shared.clone(), session.clone(), reply.clone());
    tasks.spawn(async move {
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

fn lock_confirmations(confirmations: &Mutex<Confirmations>) -> std::sync::MutexGuard<'_, Confirmations> {
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

/// The plain UDP endpoint: unauthenticated devices only.
pub(super) async fn serve_udp(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let config = &shared.config;
    let exchanges = Exchanges::new(EXCHANGE_LIFETIME, config.max_exchanges, config.max_in_flight_per_peer);
    let assemblies = Assemblies::new(EXCHANGE_LIFETIME, config.max_block_transfers, config.max_payload);
    let session = Arc::new(Session {
        identity: None,
        exchanges: Mutex::new(exchanges),
        assemblies: Mutex::new(assemblies),
        confirmations: Mutex::default(),
    });
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
        let reply = Reply::Udp { socket: socket.clone(), peer };
        if let Some(bytes) = dispatch(&shared, &tasks, &session, peer, &reply, &buf[..n]) {
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
/// handshake records, so webrtc-dtls only ever sees whole, well-formed handshake
/// messages in small numbers (see `dtls_front.rs`). A ClientHello from the address of an
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
        let admitted = HandshakeSlot::take(&handshaking, peer.ip(), shared.config.max_dtls_handshakes_per_ip)
            .ok_or("handshakes_per_ip")
            .and_then(|slot| sessions.clone().try_acquire_owned().map(|permit| (slot, permit)).map_err(|_| "sessions"));
        let (slot, permit) = match admitted {
            Ok(admitted) => admitted,
            Err(reason) => {
                dtls_dropped(reason);
                forget_if_empty(&peers, peer);
                continue;
            }
        };
        let (queue, inbox) = mpsc::channel(PEER_QUEUE);
        let _ = queue.try_send(Bytes::copy_from_slice(datagram));
        next_id += 1;
        let handle = SessionHandle {
            id: next_id,
            queue,
            established: Arc::default(),
            cancel: shutdown.child_token(),
            budget: dtls_front::HANDSHAKE_RECORD_BUDGET.saturating_sub(shape.handshake_records),
        };
        let (id, established, cancel) = (handle.id, handle.established.clone(), handle.cancel.clone());
        lock_peers(&peers).entry(peer).or_default().pending = Some(handle);
        let conn = Arc::new(PeerConn { socket: socket.clone(), peer, inbox: tokio::sync::Mutex::new(inbox) });
        let (shared, peers, tasks2) = (shared.clone(), peers.clone(), tasks.clone());
        tasks.spawn(async move {
            run_session(conn, &shared, &tasks2, &cancel, &established, slot).await;
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
        // first request may overtake the end of the server's handshake: webrtc-dtls
        // queues it until its keys are ready).
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
            // webrtc-dtls does not renegotiate: an established session takes handshake
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
    conn: Arc<PeerConn>,
    shared: &Arc<Shared>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
    established: &AtomicBool,
    slot: HandshakeSlot,
) {
    let peer = conn.peer;
    let authenticated: Arc<Mutex<Option<DeviceIdentity>>> = Arc::default();
    let config = dtls_config(shared, authenticated.clone());
    let handshake = tokio::time::timeout(shared.config.handshake_timeout, DTLSConn::new(conn, config, false, None));
    // Cancel safety: dropping the handshake drops the connection; the peer retries.
    let dtls = tokio::select! {
        _ = shutdown.cancelled() => return,
        result = handshake => match result {
            Ok(Ok(dtls)) => Arc::new(dtls),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "DTLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "DTLS handshake timed out");
                return;
            }
        },
    };
    let identity = authenticated.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(identity) = identity else {
        // Cannot happen with PSK suites only, but never serve an unknown peer.
        let _ = dtls.close().await;
        return;
    };
    drop(slot);
    established.store(true, Ordering::Release);
    tracing::debug!(%peer, tenant = %identity.tenant, device = %identity.device_id, "DTLS session up");
    let config = &shared.config;
    let exchanges = Exchanges::new(EXCHANGE_LIFETIME, config.max_exchanges_per_session, config.max_in_flight_per_peer);
    let assemblies = Assemblies::new(EXCHANGE_LIFETIME, config.max_in_flight_per_peer, config.max_payload);
    let session = Arc::new(Session {
        identity: Some(identity),
        exchanges: Mutex::new(exchanges),
        assemblies: Mutex::new(assemblies),
        confirmations: Mutex::default(),
    });
    let reply = Reply::Dtls(dtls.clone());
    let mut buf = vec![0u8; config.max_payload + HEADER_ROOM];
    loop {
        // Cancel safety: `read` takes a decrypted record from a channel; cancelling it
        // between records loses nothing.
        let n = tokio::select! {
            _ = shutdown.cancelled() => break,
            read = dtls.read(&mut buf, Some(config.session_idle_timeout)) => match read {
                Ok(n) => n,
                Err(webrtc_dtls::Error::ErrBufferTooSmall) => {
                    // Larger than any acceptable request; nothing to parse an answer from.
                    tracing::debug!(%peer, "DTLS record larger than the maximum request dropped");
                    continue;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "DTLS session ends");
                    break;
                }
            },
        };
        if let Some(bytes) = dispatch(shared, tasks, &session, peer, &reply, &buf[..n]) {
            reply.send(&bytes).await;
        }
    }
    let _ = dtls.close().await;
}

/// PSK-only DTLS 1.2 server config whose PSK callback looks the identity
/// `auth-id@tenant` up in the registry and remembers whose key it was.
fn dtls_config(shared: &Arc<Shared>, authenticated: Arc<Mutex<Option<DeviceIdentity>>>) -> webrtc_dtls::config::Config {
    let registry = shared.registry.clone();
    let timeout = shared.config.handshake_timeout;
    let runtime = tokio::runtime::Handle::current();
    let psk = move |psk_identity: &[u8]| -> Result<Vec<u8>, webrtc_dtls::Error> {
        let Some((auth_id, tenant)) = mapping::split_identity(psk_identity) else {
            return Err(webrtc_dtls::Error::Other("PSK identity is not auth-id@tenant".into()));
        };
        // webrtc-dtls calls this synchronously from inside its handshake; the registry is
        // async. `block_in_place` hands this worker's other tasks to the rest of the
        // (multi-threaded, checked in `bind`) runtime while it waits.
        let lookup = registry.psk(tenant, auth_id);
        let result = tokio::task::block_in_place(|| runtime.block_on(tokio::time::timeout(timeout, lookup)));
        match result {
            Ok(Ok((identity, key))) => {
                *authenticated.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity);
                Ok(key)
            }
            Ok(Err(e)) => Err(webrtc_dtls::Error::Other(format!("PSK identity {auth_id}@{tenant} refused: {e}"))),
            Err(_) => Err(webrtc_dtls::Error::Other("registry did not answer in time".into())),
        }
    };
    use webrtc_dtls::cipher_suite::CipherSuiteId;
    webrtc_dtls::config::Config {
        psk: Some(Arc::new(psk)),
        // webrtc-dtls's defaults are certificate suites only. CCM_8 is the one RFC 7252
        // §9.1.3.1 makes mandatory for CoAP with PSK.
        cipher_suites: vec![
            CipherSuiteId::Tls_Psk_With_Aes_128_Ccm_8,
            CipherSuiteId::Tls_Psk_With_Aes_128_Gcm_Sha256,
            CipherSuiteId::Tls_Psk_With_Aes_128_Ccm,
        ],
        // Handshake flights are retransmitted on loss; keep them under common path MTUs.
        flight_interval: Duration::from_secs(1),
        ..Default::default()
    }
}

/// One peer's datagrams on the shared DTLS socket, as the `Conn` webrtc-dtls runs on.
/// (webrtc-util's own UDP listener never forgets a peer and buffers without bound.)
struct PeerConn {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    inbox: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
}

#[async_trait]
impl webrtc_util::Conn for PeerConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other("a demultiplexed peer is always connected".into()))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let datagram = self.inbox.lock().await.recv().await.ok_or(webrtc_util::Error::ErrClosedListener)?;
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        Ok(n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        Ok((self.recv(buf).await?, self.peer))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, self.peer).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.inbox.lock().await.close();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(classify(&[0x49, 0x02, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]), Inbound::Reply(_)));
        assert!(matches!(classify(&[0x59, 0x02, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]), Inbound::Drop));
        // CON POST with an option length nibble of 15 (reserved) → RST.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xbf]), Inbound::Reply(_)));
        // CON carrying a response code (2.04) → RST; ACK / RST → answers to our CONs.
        assert!(matches!(classify(&[0x40, 0x44, 0, 1]), Inbound::Reply(_)));
        assert!(matches!(classify(&[0x60, 0x00, 0, 7]), Inbound::Answer { message_id: 7, acknowledged: true }));
        assert!(matches!(classify(&[0x70, 0x00, 1, 0]), Inbound::Answer { message_id: 256, acknowledged: false }));
        // Too many options (the H1 bloat: thousands of empty ones) → RST before parsing.
        let mut bloated = vec![0x40, 0x02, 0, 1, 0xb1, b't'];
        bloated.extend(std::iter::repeat(0x00).take(MAX_OPTIONS));
        assert!(matches!(classify(&bloated), Inbound::Reply(_)));
        bloated.truncate(6 + MAX_OPTIONS - 1);
        assert!(matches!(classify(&bloated), Inbound::Request(_)));
        // Option values over the byte bound.
        let mut long = vec![0x40, 0x02, 0, 1, 0xbe];
        long.extend_from_slice(&((MAX_OPTION_BYTES + 1 - 269) as u16).to_be_bytes());
        long.extend(std::iter::repeat(b'a').take(MAX_OPTION_BYTES + 1));
        assert!(matches!(classify(&long), Inbound::Reply(_)));
        // CON POST /t (Uri-Path option 11, length 1) → a request.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xb1, b't']), Inbound::Request(_)));
        // ... but with a payload marker and no payload → RST.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xb1, b't', 0xff]), Inbound::Reply(_)));
        // An option whose value ends in 0xFF is not a payload marker.
        assert!(matches!(classify(&[0x40, 0x02, 0, 1, 0xb1, 0xff]), Inbound::Request(_)));
    }

}
