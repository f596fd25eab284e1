//! Per-peer CoAP protocol state, as a state machine that takes events and `now` and says
//! what to do; the socket tasks in `connection.rs` only drive it.
//!
//! - [`Exchanges`]: RFC 7252 §4.5 message deduplication. A request is identified by
//!   (peer, message id); a retransmitted CON must not be processed twice, and gets the
//!   response the first one got. Entries live `EXCHANGE_LIFETIME`, the cache is bounded,
//!   and so are the requests in flight per peer.
//! - [`Confirmations`]: separate responses sent as CON (commands after a long
//!   `hono-ttd` wait), waiting for the peer's ACK or RST.
//! - [`Session`]: what a DTLS connection knows about its peer (the authenticated device).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{CoapOption, Packet};

use super::mapping::{self, Block};
use crate::device::DeviceIdentity;

/// RFC 7252 §4.8.2 with the default transmission parameters: how long a message id
/// may be reused by a peer for a retransmission (247 s). NON requests (NON_LIFETIME,
/// 145 s) share it, so that entries expire in arrival order.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// A request as the peer identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExchangeKey {
    pub peer: SocketAddr,
    pub message_id: u16,
}

/// What to do with an incoming request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// First time seen: process it, then call [`Exchanges::complete`].
    New,
    /// A duplicate of a request still being processed, or of a NON request: ignore it.
    /// (For a CON the peer retransmits again and then gets the cached answer.)
    Ignore,
    /// A duplicate of an answered CON request: send this response again.
    Replay(Bytes),
    /// The peer has too many requests in flight: refuse it without processing.
    PeerBusy,
}

#[derive(Debug)]
enum State {
    InFlight,
    Answered(Option<Bytes>),
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Tells a live entry from an older one with the same key in `order`.
    generation: u64,
}

/// The deduplication cache and in-flight accounting of one endpoint (the plain UDP
/// socket, or one DTLS session).
#[derive(Debug)]
pub struct Exchanges {
    lifetime: Duration,
    max_entries: usize,
    max_in_flight_per_peer: usize,
    entries: HashMap<ExchangeKey, Entry>,
    /// Arrival order = expiry order, since every entry lives `lifetime`.
    order: VecDeque<(Instant, ExchangeKey, u64)>,
    in_flight: HashMap<SocketAddr, usize>,
    generation: u64,
}

impl Exchanges {
    pub fn new(lifetime: Duration, max_entries: usize, max_in_flight_per_peer: usize) -> Self {
        Self {
            lifetime,
            max_entries: max_entries.max(1),
            max_in_flight_per_peer: max_in_flight_per_peer.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
            in_flight: HashMap::new(),
            generation: 0,
        }
    }

    /// A request arrived.
    pub fn receive(&mut self, key: ExchangeKey, confirmable: bool, now: Instant) -> Admission {
        self.expire(now);
        if let Some(entry) = self.entries.get(&key) {
            return match (&entry.state, confirmable) {
                (State::Answered(Some(response)), true) => Admission::Replay(response.clone()),
                _ => Admission::Ignore,
            };
        }
        let in_flight = self.in_flight.get(&key.peer).copied().unwrap_or(0);
        if in_flight >= self.max_in_flight_per_peer {
            return Admission::PeerBusy;
        }
        // Full: forget the oldest exchange. A late retransmission of it would be
        // processed again; the bound on memory matters more.
        while self.entries.len() >= self.max_entries {
            let Some((_, old, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&old).is_some_and(|e| e.generation == generation) {
                self.entries.remove(&old);
            }
        }
        self.generation += 1;
        self.entries.insert(key, Entry { state: State::InFlight, generation: self.generation });
        self.order.push_back((now + self.lifetime, key, self.generation));
        *self.in_flight.entry(key.peer).or_insert(0) += 1;
        Admission::New
    }

    /// The request `key` was processed; `response` is what was sent (cached for
    /// retransmissions of a CON), `None` when nothing needs replaying.
    pub fn complete(&mut self, key: ExchangeKey, response: Option<Bytes>) {
        if let Some(n) = self.in_flight.get_mut(&key.peer) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&key.peer);
            }
        }
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.state = State::Answered(response);
        }
    }

    /// Drops entries older than the exchange lifetime.
    pub fn expire(&mut self, now: Instant) {
        while let Some((expires, key, generation)) = self.order.front().copied() {
            if expires > now {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&key).is_some_and(|e| e.generation == generation) {
                self.entries.remove(&key);
            }
        }
    }

    /// Number of remembered exchanges.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Requests being processed for `peer`.
    pub fn in_flight(&self, peer: SocketAddr) -> usize {
        self.in_flight.get(&peer).copied().unwrap_or(0)
    }
}

/// What a Block1 request adds up to (RFC 7959 §2.5, atomic transfers).
#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    /// More blocks to come: answer 2.31 Continue with the block echoed.
    Continue,
    /// The last block arrived: the whole request, options of the first block, header
    /// and token of the last.
    Complete(Packet),
    /// The body (or its announced Size1) is over the maximum: 4.13.
    TooLarge { size: usize },
    /// A block out of sequence, or a non-final block shorter than its size: 4.08.
    Incomplete,
}

#[derive(Debug)]
struct Transfer {
    /// The first block without its payload: the request's options.
    request: Packet,
    body: Vec<u8>,
    expires: Instant,
}

/// Block-wise request bodies being received (libcoap splits anything over 1 KiB), by
/// peer and [`mapping::transfer_key`]. Bounded in number and size; abandoned transfers
/// expire after the exchange lifetime.
#[derive(Debug)]
pub struct Assemblies {
    lifetime: Duration,
    max_transfers: usize,
    max_body: usize,
    transfers: HashMap<(SocketAddr, Vec<u8>), Transfer>,
}

impl Assemblies {
    pub fn new(lifetime: Duration, max_transfers: usize, max_body: usize) -> Self {
        Self { lifetime, max_transfers: max_transfers.max(1), max_body, transfers: HashMap::new() }
    }

    /// A request carrying `block` (its Block1 option) arrived from `peer`.
    pub fn add(
        &mut self,
        peer: SocketAddr,
        packet: &Packet,
        block: Block,
        now: Instant,
    ) -> Assembled {
        self.transfers.retain(|_, t| t.expires > now);
        let key = (peer, mapping::transfer_key(packet));
        if block.num == 0 {
            if let Some(size) = mapping::size1(packet).filter(|size| *size > self.max_body) {
                self.transfers.remove(&key);
                return Assembled::TooLarge { size };
            }
            if !self.transfers.contains_key(&key) && self.transfers.len() >= self.max_transfers {
                // Full: give up the transfer that has waited longest for its next block.
                let oldest =
                    self.transfers.iter().min_by_key(|(_, t)| t.expires).map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.transfers.remove(&oldest);
                }
            }
            let mut request = packet.clone();
            request.payload = Vec::new();
            // A new first block restarts the transfer (the device started over).
            self.transfers
                .insert(key.clone(), Transfer { request, body: Vec::new(), expires: now });
        }
        let Some(transfer) = self.transfers.get_mut(&key) else { return Assembled::Incomplete };
        let offset = (block.num as usize).saturating_mul(block.size());
        let short = block.more && packet.payload.len() != block.size();
        if offset != transfer.body.len() || short {
            self.transfers.remove(&key);
            return Assembled::Incomplete;
        }
        let size = transfer.body.len() + packet.payload.len();
        if size > self.max_body {
            self.transfers.remove(&key);
            return Assembled::TooLarge { size };
        }
        transfer.body.extend_from_slice(&packet.payload);
        transfer.expires = now + self.lifetime;
        if block.more {
            return Assembled::Continue;
        }
        let Some(transfer) = self.transfers.remove(&key) else { return Assembled::Incomplete };
        let mut whole = transfer.request;
        whole.header = packet.header.clone();
        whole.set_token(packet.get_token().to_vec());
        whole.payload = transfer.body;
        whole.clear_option(CoapOption::Block1);
        whole.clear_option(CoapOption::Size1);
        Assembled::Complete(whole)
    }

    /// Transfers in progress.
    pub fn len(&self) -> usize {
        self.transfers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty()
    }
}

/// Our CON messages (separate responses, RFC 7252 §5.2.2) awaiting the peer's ACK or
/// RST, by (peer, message id).
#[derive(Debug, Default)]
pub struct Confirmations {
    waiting: HashMap<ExchangeKey, tokio::sync::oneshot::Sender<bool>>,
}

impl Confirmations {
    /// A CON with `key` goes out: the receiver says `true` on ACK, `false` on RST.
    pub fn expect(&mut self, key: ExchangeKey) -> tokio::sync::oneshot::Receiver<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.insert(key, tx);
        rx
    }

    /// An ACK (`acknowledged`) or RST arrived; false if nothing waited for it.
    pub fn resolve(&mut self, key: ExchangeKey, acknowledged: bool) -> bool {
        self.waiting.remove(&key).is_some_and(|tx| tx.send(acknowledged).is_ok())
    }

    /// Gives up on `key` (retransmissions exhausted).
    pub fn forget(&mut self, key: ExchangeKey) {
        self.waiting.remove(&key);
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// One endpoint's protocol state: the plain UDP socket (no identity: every peer is
/// unauthenticated) or one DTLS session (the device its PSK belongs to). Shared with the
/// tasks that process its requests.
#[derive(Debug)]
pub struct Session {
    pub identity: Option<DeviceIdentity>,
    pub exchanges: Mutex<Exchanges>,
    pub assemblies: Mutex<Assemblies>,
    pub confirmations: Mutex<Confirmations>,
    /// The session's last registry decisions (`door::Memo`).
    pub memo: crate::door::Memo,
}

#[cfg(test)]
mod tests {
    use super::*;

    use coap_lite::{MessageClass, MessageType, RequestType};

    fn block(message_id: u16, num: u32, more: bool, payload: &[u8]) -> (Packet, Block) {
        let mut p = Packet::new();
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Put);
        p.header.message_id = message_id;
        p.set_token(vec![message_id as u8]);
        p.add_option(CoapOption::UriPath, b"t".to_vec());
        if num == 0 {
            p.add_option(CoapOption::ContentFormat, vec![50]);
        }
        let block = Block { num, more, szx: 0 }; // 16-byte blocks
        p.add_option(CoapOption::Block1, block.encode());
        p.payload = payload.to_vec();
        (p, block)
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[test]
    fn blocks_add_up_to_the_whole_request() {
        let now = Instant::now();
        let mut a = Assemblies::new(EXCHANGE_LIFETIME, 4, 100);
        let (p0, b0) = block(1, 0, true, &[b'a'; 16]);
        assert_eq!(a.add(peer(), &p0, b0, now), Assembled::Continue);
        let (p1, b1) = block(2, 1, true, &[b'b'; 16]);
        assert_eq!(a.add(peer(), &p1, b1, now), Assembled::Continue);
        let (p2, b2) = block(3, 2, false, b"end");
        let Assembled::Complete(whole) = a.add(peer(), &p2, b2, now) else { panic!("complete") };
        assert_eq!(whole.payload.len(), 35);
        assert!(whole.payload.ends_with(b"end"));
        assert_eq!(whole.header.message_id, 3, "answered as the last block");
        assert_eq!(whole.get_token(), &[3]);
        assert_eq!(
            whole.get_first_option(CoapOption::ContentFormat),
            Some(&vec![50]),
            "options of the first block"
        );
        assert_eq!(whole.get_first_option(CoapOption::Block1), None);
        assert!(a.is_empty());
    }

    #[test]
    fn blocks_out_of_sequence_or_too_many_bytes_are_refused() {
        let now = Instant::now();
        let mut a = Assemblies::new(EXCHANGE_LIFETIME, 4, 40);
        let (p1, b1) = block(2, 1, true, &[0; 16]);
        assert_eq!(a.add(peer(), &p1, b1, now), Assembled::Incomplete, "no first block");
        let (p0, b0) = block(1, 0, true, &[0; 10]);
        assert_eq!(a.add(peer(), &p0, b0, now), Assembled::Incomplete, "short non-final block");
        let (p0, b0) = block(1, 0, true, &[0; 16]);
        assert_eq!(a.add(peer(), &p0, b0, now), Assembled::Continue);
        assert_eq!(a.add(peer(), &p1, b1, now), Assembled::Continue);
        let (p2, b2) = block(3, 2, false, &[0; 16]);
        assert_eq!(a.add(peer(), &p2, b2, now), Assembled::TooLarge { size: 48 });
        assert!(a.is_empty());
        let (mut big, b0) = block(4, 0, true, &[0; 16]);
        big.add_option(CoapOption::Size1, vec![0x10, 0x00]);
        assert_eq!(
            a.add(peer(), &big, b0, now),
            Assembled::TooLarge { size: 4096 },
            "announced size"
        );
    }

    #[test]
    fn transfers_are_bounded_and_expire() {
        let now = Instant::now();
        let mut a = Assemblies::new(Duration::from_secs(10), 2, 100);
        for port in 1..=3u16 {
            let (p, b) = block(1, 0, true, &[0; 16]);
            assert_eq!(
                a.add(SocketAddr::from(([127, 0, 0, 1], port)), &p, b, now),
                Assembled::Continue
            );
        }
        assert_eq!(a.len(), 2);
        let (p1, b1) = block(2, 1, false, b"x");
        assert_eq!(
            a.add(SocketAddr::from(([127, 0, 0, 1], 3)), &p1, b1, now + Duration::from_secs(11)),
            Assembled::Incomplete
        );
        assert!(a.is_empty(), "expired");
    }

    fn key(port: u16, message_id: u16) -> ExchangeKey {
        ExchangeKey { peer: SocketAddr::from(([127, 0, 0, 1], port)), message_id }
    }

    #[test]
    fn duplicate_con_is_processed_once_and_replayed() {
        let now = Instant::now();
        let mut x = Exchanges::new(EXCHANGE_LIFETIME, 100, 4);
        assert_eq!(x.receive(key(1, 7), true, now), Admission::New);
        assert_eq!(x.receive(key(1, 7), true, now), Admission::Ignore, "still in flight");
        x.complete(key(1, 7), Some(Bytes::from_static(b"ack")));
        assert_eq!(x.receive(key(1, 7), true, now), Admission::Replay(Bytes::from_static(b"ack")));
        // Same id from another peer is another exchange.
        assert_eq!(x.receive(key(2, 7), true, now), Admission::New);
    }

    #[test]
    fn confirmations_match_acks_by_peer_and_message_id() {
        let mut c = Confirmations::default();
        let mut acked = c.expect(key(1, 5));
        let mut reset = c.expect(key(2, 5));
        assert!(!c.resolve(key(1, 6), true), "other message id");
        assert!(c.resolve(key(1, 5), true));
        assert!(c.resolve(key(2, 5), false));
        assert_eq!((acked.try_recv(), reset.try_recv()), (Ok(true), Ok(false)));
        assert!(!c.resolve(key(1, 5), true), "answered once");
        let _late = c.expect(key(3, 1));
        c.forget(key(3, 1));
        assert!(c.is_empty());
    }

    #[test]
    fn duplicate_non_is_ignored() {
        let now = Instant::now();
        let mut x = Exchanges::new(EXCHANGE_LIFETIME, 100, 4);
        assert_eq!(x.receive(key(1, 1), false, now), Admission::New);
        x.complete(key(1, 1), None);
        assert_eq!(x.receive(key(1, 1), false, now), Admission::Ignore);
    }

    #[test]
    fn entries_expire_after_the_exchange_lifetime() {
        let now = Instant::now();
        let mut x = Exchanges::new(Duration::from_secs(10), 100, 4);
        x.receive(key(1, 1), true, now);
        x.complete(key(1, 1), Some(Bytes::from_static(b"a")));
        x.receive(key(1, 2), true, now + Duration::from_secs(5));
        x.complete(key(1, 2), Some(Bytes::from_static(b"b")));
        x.expire(now + Duration::from_secs(10));
        assert_eq!(x.len(), 1);
        assert_eq!(
            x.receive(key(1, 1), true, now + Duration::from_secs(10)),
            Admission::New,
            "a reused id is new"
        );
        assert!(matches!(
            x.receive(key(1, 2), true, now + Duration::from_secs(11)),
            Admission::Replay(_)
        ));
    }

    #[test]
    fn the_cache_is_bounded() {
        let now = Instant::now();
        let mut x = Exchanges::new(EXCHANGE_LIFETIME, 3, 100);
        for id in 0..10 {
            assert_eq!(x.receive(key(1, id), true, now), Admission::New);
            x.complete(key(1, id), Some(Bytes::new()));
        }
        assert_eq!(x.len(), 3);
        assert!(x.order.len() <= 3);
        assert_eq!(x.receive(key(1, 0), true, now), Admission::New, "evicted");
        assert!(matches!(x.receive(key(1, 9), true, now), Admission::Replay(_)));
    }

    #[test]
    fn in_flight_requests_per_peer_are_bounded() {
        let now = Instant::now();
        let mut x = Exchanges::new(EXCHANGE_LIFETIME, 100, 2);
        assert_eq!(x.receive(key(1, 1), true, now), Admission::New);
        assert_eq!(x.receive(key(1, 2), true, now), Admission::New);
        assert_eq!(x.receive(key(1, 3), true, now), Admission::PeerBusy);
        assert_eq!(x.receive(key(2, 3), true, now), Admission::New, "other peers are not affected");
        x.complete(key(1, 1), Some(Bytes::new()));
        assert_eq!(x.in_flight(key(1, 0).peer), 1);
        assert_eq!(x.receive(key(1, 3), true, now), Admission::New);
        // Completing an exchange the cache already forgot still frees its slot.
        let mut y = Exchanges::new(EXCHANGE_LIFETIME, 1, 2);
        y.receive(key(1, 1), true, now);
        y.receive(key(1, 2), true, now);
        y.complete(key(1, 1), None);
        y.complete(key(1, 2), None);
        assert_eq!(y.in_flight(key(1, 0).peer), 0);
    }
}
