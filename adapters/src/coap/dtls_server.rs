//! The DTLS listener: one UDP socket demultiplexed into per-peer sessions (a pending
//! handshake and an established session per address; the stateless cookie exchange and
//! the per-source handshake caps come first), each session's loop, and the PSK look-up.
//! Decrypted requests go to `connection::dispatch` like plain ones.

use super::connection::{
    dispatch, receive, send_all, Reply, HEADER_ROOM, MAX_DATAGRAM, PEER_QUEUE,
};
use super::handler::Shared;
use super::session::{Assemblies, Exchanges, Session, EXCHANGE_LIFETIME};
use super::{dtls, dtls_front};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    while let Some((n, peer)) = receive(&socket, &mut buf, &shutdown, "CoAP DTLS").await {
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
pub(super) struct PeerLink {
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    inbox: mpsc::Receiver<Bytes>,
}
pub(super) fn dtls_dropped(reason: &'static str) {
    metrics::counter!("ferrule_coap_dtls_dropped_total", "reason" => reason).increment(1);
}

pub(super) fn forget_if_empty(peers: &Peers, peer: SocketAddr) {
    let mut peers = lock_peers(peers);
    if peers.get(&peer).is_some_and(PeerEntry::is_empty) {
        peers.remove(&peer);
    }
}

/// The DTLS sessions by peer address.
pub(super) type Peers = Arc<Mutex<HashMap<SocketAddr, PeerEntry>>>;

/// Handshaking sessions per source IP.
pub(super) type Handshaking = Arc<Mutex<HashMap<std::net::IpAddr, usize>>>;

/// One handshaking session's place in the per-IP count, given back when dropped (the
/// handshake completed or failed).
pub(super) struct HandshakeSlot {
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
pub(super) struct PeerEntry {
    current: Option<SessionHandle>,
    pending: Option<SessionHandle>,
}

pub(super) struct SessionHandle {
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
pub(super) enum Route {
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

pub(super) fn lock_peers(
    peers: &Peers,
) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, PeerEntry>> {
    peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Handshake, then serve one DTLS session until it idles out, fails or is cancelled.
pub(super) async fn run_session(
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
        memo: Default::default(),
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
pub(super) async fn look_up_psk(shared: &Arc<Shared>, data: &dtls::SessionData, identity: &[u8]) {
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
