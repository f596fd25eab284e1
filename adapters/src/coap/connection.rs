//! What happens to a datagram once it is a request: classification and bounds before
//! coap-lite parses it, exchange deduplication, Block1 assembly, the request task and the
//! answer (piggy-backed, or an empty ACK and a separate response when the upload or the
//! `hono-ttd` wait takes longer); and the plain UDP loop. The DTLS listener
//! (`dtls_server`) hands decrypted requests to the same [`dispatch`].
//!
//! Size: about 580 lines of code, one request's path from datagram to answer; the rest
//! are its tests.
//!
//! Neither loop ever waits for the registry or the messaging core: each request is
//! checked against its session's exchanges and then processed in its own task, bounded
//! by the adapter-wide in-flight semaphore and the per-peer limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{CoapOption, MessageType, Packet};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::handler::{Failure, Handled, Poll, Shared};
use super::session::{
    Admission, Assembled, Assemblies, Confirmations, ExchangeKey, Exchanges, Session,
    EXCHANGE_LIFETIME,
};
use super::{dtls, mapping};
use crate::downstream::UploadError;
use crate::poll::Confirmation;

/// Largest UDP datagram; one such buffer per socket loop.
pub(super) const MAX_DATAGRAM: usize = 65_535;
/// Datagrams queued for one DTLS peer before further ones are dropped (UDP semantics).
pub(super) const PEER_QUEUE: usize = 32;
/// Room for the CoAP header, token and options on top of the payload.
pub(super) const HEADER_ROOM: usize = 1024;
/// Pause after a failed receive.
pub(super) const RECEIVE_ERROR_PAUSE: Duration = Duration::from_millis(1);
/// A CON request still waiting for a command after this long gets an empty ACK, and
/// the answer comes later as a separate CON response (RFC 7252 §5.2.2). Well under
/// ACK_TIMEOUT (2 s), so the client does not retransmit in between.
pub(super) const SEPARATE_RESPONSE_AFTER: Duration = Duration::from_millis(1500);
/// RFC 7252 §4.8 defaults for our separate CON responses.
pub(super) const ACK_TIMEOUT: Duration = Duration::from_secs(2);
pub(super) const MAX_RETRANSMIT: u32 = 4;

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
pub(super) fn options_within_bounds(datagram: &[u8]) -> bool {
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
pub(super) fn marker_without_payload(packet: &Packet, datagram: &[u8]) -> bool {
    packet.payload.is_empty()
        && datagram.last() == Some(&0xff)
        && packet.to_bytes_unlimited().is_ok_and(|encoded| encoded.len() < datagram.len())
}

/// An empty Reset for `message_id`: Ver 1, T = RST (3), TKL 0, Code 0.00.
pub(super) fn reset(message_id: u16) -> Bytes {
    let [hi, lo] = message_id.to_be_bytes();
    Bytes::copy_from_slice(&[0x70, 0x00, hi, lo])
}

pub(super) fn encode(packet: &Packet) -> Option<Bytes> {
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
pub(super) enum Reply {
    Udp { socket: Arc<UdpSocket>, peer: SocketAddr, replies: Arc<ReplyBudget> },
    Dtls { session: Arc<dtls::Session>, socket: Arc<UdpSocket>, peer: SocketAddr },
}

impl Reply {
    pub(super) async fn send(&self, bytes: &[u8]) {
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
pub(super) fn dispatch(
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
        let exchange = Exchange { session: &session, key, reply: &reply, confirmable };
        let answer = async |response: Packet| {
            exchange.answer(encode(&response)).await;
        };
        let (packet, last_block) = match unchecked_first {
            None => (packet, last_block),
            Some(block) => {
                if let Err(failure) = shared.may_upload_unauthenticated(&session, &packet).await {
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
        exchange.respond(&shared, packet, finish).await;
        drop(permit);
    });
    None
}

/// One request being answered: where its answers go and where they are remembered for
/// its retransmissions.
struct Exchange<'a> {
    session: &'a Session,
    key: ExchangeKey,
    reply: &'a Reply,
    confirmable: bool,
}

impl Exchange<'_> {
    /// Answers now (piggy-backed on the ACK of a CON, or NON); remembered for
    /// retransmissions of a CON. Whether an answer went out.
    async fn answer(&self, response: Option<Bytes>) -> bool {
        let confirmable = self.confirmable;
        lock(&self.session.exchanges).complete(self.key, response.clone().filter(|_| confirmable));
        let Some(bytes) = response else { return false };
        self.reply.send(&bytes).await;
        true
    }

    /// Handles the whole request and answers it. A CON request whose answer is not ready
    /// after [`SEPARATE_RESPONSE_AFTER`] (an upload the application is slow to take, or a
    /// `hono-ttd` wait for a command) gets an empty ACK then, and the answer later as a
    /// separate CON (RFC 7252 §5.2.2), retransmitted until the device acknowledges it.
    async fn respond(
        &self,
        shared: &Arc<Shared>,
        packet: Packet,
        finish: impl Fn(Packet) -> Option<Bytes>,
    ) {
        let ack_by = tokio::time::Instant::now() + SEPARATE_RESPONSE_AFTER;
        let handling = shared.handle(self.session, packet);
        let mut handling = std::pin::pin!(handling);
        let handled = if self.confirmable {
            // Biased: a request answered at once never arms the timer.
            tokio::select! {
                biased;
                handled = &mut handling => Some(handled),
                () = tokio::time::sleep_until(ack_by) => None,
            }
        } else {
            Some(handling.as_mut().await)
        };
        match handled {
            Some(Handled::Done(response)) => {
                self.answer(finish(response)).await;
            }
            Some(Handled::Poll(poll)) => self.command_poll(shared, *poll, ack_by, finish).await,
            None => {
                self.acknowledge_empty().await;
                let (response, confirmation) = match handling.await {
                    Handled::Done(response) => (response, None),
                    Handled::Poll(poll) => shared.wait_for_command(&poll).await,
                };
                self.separate_response(shared, response, confirmation, finish).await;
            }
        }
    }

    /// The wait for a command after an accepted upload with `hono-ttd`. A NON request, or
    /// a CON whose command comes before `ack_by`, gets it piggy-backed; a CON still
    /// waiting then gets an empty ACK and the answer as a separate CON. The command is
    /// `accepted` once the answer carrying it went out (piggy-backed / NON; a lost one is
    /// replayed from the exchange cache when the device retransmits) or the device
    /// acknowledged it (separate).
    async fn command_poll(
        &self,
        shared: &Arc<Shared>,
        poll: Poll,
        ack_by: tokio::time::Instant,
        finish: impl Fn(Packet) -> Option<Bytes>,
    ) {
        let waiting = shared.wait_for_command(&poll);
        let mut waiting = std::pin::pin!(waiting);
        let early = if poll.confirmable() {
            tokio::time::timeout_at(ack_by, &mut waiting).await.ok()
        } else {
            Some(waiting.as_mut().await)
        };
        if let Some((response, confirmation)) = early {
            if self.answer(finish(response)).await {
                if let Some(confirmation) = confirmation {
                    confirmation.accepted();
                }
            }
            return;
        }
        self.acknowledge_empty().await;
        let (response, confirmation) = waiting.await;
        self.separate_response(shared, response, confirmation, finish).await;
    }

    /// Sends the empty ACK (RFC 7252 §5.2.2), replayed to retransmissions.
    async fn acknowledge_empty(&self) {
        let ack = empty_ack(self.key.message_id);
        lock(&self.session.exchanges).complete(self.key, Some(ack.clone()));
        self.reply.send(&ack).await;
    }

    /// Sends `response` (the request was acknowledged empty) as a separate CON,
    /// retransmitted until the device acknowledges it; then confirms the command it
    /// carries.
    async fn separate_response(
        &self,
        shared: &Shared,
        mut response: Packet,
        confirmation: Option<Confirmation>,
        finish: impl Fn(Packet) -> Option<Bytes>,
    ) {
        response.header.set_type(MessageType::Confirmable);
        response.header.message_id = shared.message_id();
        let con = ExchangeKey { peer: self.key.peer, message_id: response.header.message_id };
        let Some(bytes) = finish(response) else { return };
        let mut answered = lock_confirmations(&self.session.confirmations).expect(con);
        // Cancel safety of the loop: `answered` and the timer are polled by reference and
        // lose nothing when the other branch wins.
        let mut timeout = ACK_TIMEOUT;
        let mut acknowledged = false;
        for _ in 0..=MAX_RETRANSMIT {
            self.reply.send(&bytes).await;
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
        lock_confirmations(&self.session.confirmations).forget(con);
        if acknowledged {
            if let Some(confirmation) = confirmation {
                confirmation.accepted();
            }
        } else {
            tracing::debug!(peer = %self.key.peer, "separate CoAP response not acknowledged");
        }
    }
}

/// An empty ACK for `message_id`: Ver 1, T = ACK (2), TKL 0, Code 0.00.
pub(super) fn empty_ack(message_id: u16) -> Bytes {
    let [hi, lo] = message_id.to_be_bytes();
    Bytes::copy_from_slice(&[0x60, 0x00, hi, lo])
}

pub(super) fn lock_confirmations(
    confirmations: &Mutex<Confirmations>,
) -> std::sync::MutexGuard<'_, Confirmations> {
    confirmations.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Like [`lock`]: short critical sections, consistent data even if poisoned.
pub(super) fn lock_assemblies(
    assemblies: &Mutex<Assemblies>,
) -> std::sync::MutexGuard<'_, Assemblies> {
    assemblies.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The exchanges' lock is held for a few map operations only; a poisoned one still
/// holds consistent data (no code panics while holding it), so keep serving.
pub(super) fn lock(exchanges: &Mutex<Exchanges>) -> std::sync::MutexGuard<'_, Exchanges> {
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
pub(super) const MAX_REPLY_SOURCES: usize = 65_536;

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
        memo: Default::default(),
    });
    let replies = Arc::new(ReplyBudget::new(shared.config.reply_rate_per_ip));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while let Some((n, peer)) = receive(&socket, &mut buf, &shutdown, "CoAP UDP").await {
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

pub(super) async fn send_all(socket: &UdpSocket, peer: SocketAddr, datagrams: Vec<Vec<u8>>) {
    for datagram in datagrams {
        if let Err(error) = socket.send_to(&datagram, peer).await {
            tracing::debug!(%peer, %error, "cannot send a DTLS record");
        }
    }
}

/// The next datagram on `socket`, or `None` once `shutdown` is cancelled. Receive errors
/// are transient (an ICMP error of an earlier send): logged, then after a short pause
/// (which keeps a persistent failure from spinning) the next datagram is awaited.
///
/// # Cancel safety
/// `recv_from` loses nothing when cancelled.
pub(super) async fn receive(
    socket: &UdpSocket,
    buf: &mut [u8],
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(usize, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            received = socket.recv_from(buf) => match received {
                Ok(received) => return Some(received),
                Err(e) => {
                    tracing::debug!(error = %e, "{what} receive failed");
                    tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
                }
            },
        }
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
