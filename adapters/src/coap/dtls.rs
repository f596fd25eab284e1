//! DTLS 1.2 with pre-shared keys for CoAP, on OpenSSL, behind a stateless cookie
//! exchange (RFC 6347 §4.2.1) done before any per-peer state exists.
//!
//! - A ClientHello without a valid cookie gets a HelloVerifyRequest built here from
//!   the datagram alone ([`hello_verify_request`]); nothing is remembered. The cookie is
//!   an HMAC of the peer's address and a time bucket under a per-process key, so a
//!   spoofed source address never gets past this point.
//! - A ClientHello with a valid cookie starts a session. OpenSSL's server must see a
//!   ClientHello without cookie first (message_seq 0) to answer the one with cookie
//!   (message_seq 1); so it is given a synthetic first ClientHello (the real one with the
//!   cookie removed), its own HelloVerifyRequest is discarded, and then the real
//!   ClientHello comes. Its cookie callbacks compute the same HMAC, so the exchange is
//!   consistent, and the handshake transcript is exactly the client's: the first
//!   ClientHello and the HelloVerifyRequest are not part of it (RFC 6347 §4.2.1).
//! - The PSK identity (`auth-id@tenant`) is read from the ClientKeyExchange before OpenSSL
//!   sees it and looked up in the registry asynchronously; OpenSSL's (synchronous) PSK
//!   callback then only reads the result.
//!
//! webrtc-dtls, used before, cannot be fronted like this: it insists on a random cookie
//! of its own and on the first ClientHello it sees having message_seq 0.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVersion};
use sha2::Sha256;

use crate::device::DeviceIdentity;

/// Bytes of the cookie (RFC 6347 allows up to 255).
const COOKIE_LEN: usize = 16;
/// A cookie is valid in the bucket it was made in and the next one.
const COOKIE_BUCKET: Duration = Duration::from_secs(30);
/// Path MTU assumed for our handshake flights and records.
const MTU: usize = 1200;

const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;

/// The per-process DTLS server state: OpenSSL context and cookie key.
pub(super) struct DtlsServer {
    context: SslContext,
    cookies: Arc<CookieKey>,
    session_data: openssl::ex_data::Index<Ssl, Arc<SessionData>>,
}

/// What the OpenSSL callbacks of one session read.
#[derive(Default)]
pub(super) struct SessionData {
    pub(super) peer: Mutex<Option<SocketAddr>>,
    /// The identity from the ClientKeyExchange, its key, and whose key it is.
    pub(super) psk: Mutex<Option<PskMatch>>,
}

/// A PSK identity as presented, its key, and the device it belongs to.
pub(super) type PskMatch = (Vec<u8>, Vec<u8>, DeviceIdentity);

/// HMAC key for cookies; random per process.
pub(super) struct CookieKey(Hmac<Sha256>);

impl CookieKey {
    pub(super) fn random() -> Self {
        let key: [u8; 32] = rand_bytes();
        Self(<Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC takes any key length"))
    }

    fn bucket(now: SystemTime) -> u64 {
        now.duration_since(UNIX_EPOCH).map(|d| d.as_secs() / COOKIE_BUCKET.as_secs()).unwrap_or(0)
    }

    fn make(&self, peer: SocketAddr, bucket: u64) -> [u8; COOKIE_LEN] {
        let mut mac = self.0.clone();
        match peer {
            SocketAddr::V4(a) => mac.update(&a.ip().octets()),
            SocketAddr::V6(a) => mac.update(&a.ip().octets()),
        }
        mac.update(&peer.port().to_be_bytes());
        mac.update(&bucket.to_be_bytes());
        let tag = mac.finalize().into_bytes();
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.copy_from_slice(&tag[..COOKIE_LEN]);
        cookie
    }

    pub(super) fn cookie(&self, peer: SocketAddr) -> [u8; COOKIE_LEN] {
        self.make(peer, Self::bucket(SystemTime::now()))
    }

    pub(super) fn verify(&self, peer: SocketAddr, cookie: &[u8]) -> bool {
        use subtle_eq::ct_eq;
        let bucket = Self::bucket(SystemTime::now());
        [bucket, bucket.saturating_sub(1)].iter().any(|b| ct_eq(&self.make(peer, *b), cookie))
    }
}

/// Constant-time comparison without another dependency.
mod subtle_eq {
    pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    openssl::rand::rand_bytes(&mut out).expect("OpenSSL's random generator works");
    out
}

impl DtlsServer {
    pub(super) fn new() -> Result<Self, openssl::error::ErrorStack> {
        let cookies = Arc::new(CookieKey::random());
        let session_data = Ssl::new_ex_index::<Arc<SessionData>>()?;
        let mut builder = SslContext::builder(SslMethod::dtls_server())?;
        builder.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
        builder.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
        // CCM_8 is the suite RFC 7252 §9.1.3.1 makes mandatory for CoAP with PSK.
        builder.set_cipher_list("PSK-AES128-CCM8:PSK-AES128-GCM-SHA256:PSK-AES128-CCM")?;
        builder.set_options(
            SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU | SslOptions::NO_TICKET,
        );
        let key = cookies.clone();
        builder.set_cookie_generate_cb(move |ssl, out| {
            let peer = peer_of(ssl, session_data).ok_or_else(openssl::error::ErrorStack::get)?;
            let cookie = key.cookie(peer);
            out[..COOKIE_LEN].copy_from_slice(&cookie);
            Ok(COOKIE_LEN)
        });
        let key = cookies.clone();
        builder.set_cookie_verify_cb(move |ssl, cookie| {
            peer_of(ssl, session_data).is_some_and(|p| key.verify(p, cookie))
        });
        builder.set_psk_server_callback(move |ssl, identity, out| {
            let data = ssl.ex_data(session_data).cloned();
            let found = data.and_then(|d| d.psk.lock().unwrap_or_else(|p| p.into_inner()).clone());
            match (identity, found) {
                (Some(identity), Some((expected, key, _)))
                    if identity == expected.as_slice() && key.len() <= out.len() =>
                {
                    out[..key.len()].copy_from_slice(&key);
                    Ok(key.len())
                }
                // Unknown identity: a zero-length key fails the handshake (bad_record_mac /
                // decrypt_error for the client), as for a wrong key.
                _ => Ok(0),
            }
        });
        Ok(Self { context: builder.build(), cookies, session_data })
    }

    pub(super) fn cookies(&self) -> &CookieKey {
        &self.cookies
    }

    /// Starts a session for `peer` whose ClientHello `hello` (a whole datagram) carried a
    /// valid cookie. Returns the handshake in progress and the first flight to send.
    pub(super) fn start(
        &self,
        peer: SocketAddr,
        hello: &[u8],
    ) -> Result<(Handshake, Vec<Vec<u8>>), String> {
        let (synthetic, hello) =
            rewrite_for_handover(hello).ok_or("ClientHello cannot be rewritten")?;
        let data = Arc::new(SessionData::default());
        *data.peer.lock().unwrap_or_else(|p| p.into_inner()) = Some(peer);
        let mut ssl = Ssl::new(&self.context).map_err(|e| e.to_string())?;
        ssl.set_ex_data(self.session_data, data.clone());
        ssl.set_mtu(MTU as u32).map_err(|e| e.to_string())?;
        ssl.set_accept_state();
        let mut stream = SslStream::new(ssl, Datagrams::default()).map_err(|e| e.to_string())?;
        // OpenSSL's own HelloVerifyRequest to the synthetic first ClientHello: the client
        // already had ours (same cookie), so it is dropped.
        stream.get_mut().incoming.push_back(Bytes::from(synthetic));
        match stream.do_handshake() {
            Err(e) if e.code() == ErrorCode::WANT_READ => {}
            Err(e) => return Err(format!("DTLS handshake failed on the first ClientHello: {e}")),
            Ok(()) => return Err("DTLS handshake finished early".into()),
        }
        stream.get_mut().outgoing.clear();
        let mut handshake = Handshake { stream: Some(stream), data };
        let flight = handshake.feed(Bytes::from(hello))?;
        Ok((handshake, flight))
    }
}

fn peer_of(
    ssl: &openssl::ssl::SslRef,
    index: openssl::ex_data::Index<Ssl, Arc<SessionData>>,
) -> Option<SocketAddr> {
    *ssl.ex_data(index)?.peer.lock().unwrap_or_else(|p| p.into_inner())
}

/// The datagrams between OpenSSL and the socket: one `read` is one datagram, one
/// `write` one record (each sent as its own datagram).
#[derive(Debug, Default)]
pub(super) struct Datagrams {
    incoming: VecDeque<Bytes>,
    outgoing: Vec<Vec<u8>>,
}

impl Read for Datagrams {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.incoming.pop_front() {
            Some(datagram) => {
                let n = datagram.len().min(buf.len());
                buf[..n].copy_from_slice(&datagram[..n]);
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Datagrams {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.outgoing.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A handshake in progress.
pub(super) struct Handshake {
    /// `None` once the handshake is over (or failed).
    stream: Option<SslStream<Datagrams>>,
    data: Arc<SessionData>,
}

/// How often a handshake's retransmission timer is looked at (OpenSSL's own timer starts
/// at one second and doubles).
pub(super) const RETRANSMIT_INTERVAL: Duration = Duration::from_millis(500);

/// `DTLS_CTRL_HANDLE_TIMEOUT` from OpenSSL's ssl.h (the `DTLSv1_handle_timeout` macro),
/// which openssl-sys does not export.
const DTLS_CTRL_HANDLE_TIMEOUT: std::os::raw::c_int = 74;

/// What feeding a handshake datagram led to.
pub(super) enum Step {
    /// Send these and wait for more.
    Continue(Vec<Vec<u8>>),
    /// Done: send these; the session is up.
    Established(Session, Vec<Vec<u8>>),
    /// Failed: send these (the alert) and give up.
    Failed(String, Vec<Vec<u8>>),
}

impl Handshake {
    pub(super) fn data(&self) -> &Arc<SessionData> {
        &self.data
    }

    fn feed(&mut self, datagram: Bytes) -> Result<Vec<Vec<u8>>, String> {
        match self.step(datagram)? {
            Step::Continue(flight) => Ok(flight),
            Step::Established(..) => Err("DTLS handshake finished on the ClientHello".into()),
            Step::Failed(error, _) => Err(error),
        }
    }

    /// Retransmits OpenSSL's last flight if its timer expired (a lost flight is otherwise
    /// only resent when the peer retransmits a whole flight of its own).
    pub(super) fn handle_timeout(&mut self) -> Vec<Vec<u8>> {
        let Some(stream) = self.stream.as_mut() else { return Vec::new() };
        use foreign_types::ForeignTypeRef;
        // SAFETY: `stream.ssl()` is a live SSL owned by this handshake;
        // DTLS_CTRL_HANDLE_TIMEOUT takes no arguments and only runs the retransmission
        // timer, writing through the connection's BIO (our `Datagrams`, which never fails).
        unsafe {
            openssl_sys::SSL_ctrl(
                stream.ssl().as_ptr(),
                DTLS_CTRL_HANDLE_TIMEOUT,
                0,
                std::ptr::null_mut(),
            );
        }
        std::mem::take(&mut stream.get_mut().outgoing)
    }

    /// Feeds one datagram of the peer's.
    pub(super) fn step(&mut self, datagram: Bytes) -> Result<Step, String> {
        let Some(mut stream) = self.stream.take() else {
            return Err("DTLS handshake already over".into());
        };
        stream.get_mut().incoming.push_back(datagram);
        let result = stream.do_handshake();
        let flight = std::mem::take(&mut stream.get_mut().outgoing);
        match result {
            Ok(()) => {
                let identity = self
                    .data
                    .psk
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|(_, _, id)| id);
                let identity = identity.ok_or("DTLS handshake without a PSK identity")?;
                Ok(Step::Established(Session { stream: Mutex::new(stream), identity }, flight))
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                self.stream = Some(stream);
                Ok(Step::Continue(flight))
            }
            Err(e) => Ok(Step::Failed(format!("DTLS handshake failed: {e}"), flight)),
        }
    }
}

/// An established session.
pub(super) struct Session {
    stream: Mutex<SslStream<Datagrams>>,
    pub(super) identity: DeviceIdentity,
}

/// What a datagram of an established session carried.
pub(super) enum Received {
    /// Decrypted application data (zero or more records), and records to send back
    /// (e.g. a retransmitted final flight).
    Data(Vec<Vec<u8>>, Vec<Vec<u8>>),
    /// The peer closed the session (close_notify) or it failed.
    Closed(Vec<Vec<u8>>),
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, SslStream<Datagrams>> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decrypts one datagram (records that fail to decrypt are dropped by OpenSSL).
    pub(super) fn receive(&self, datagram: Bytes, max: usize) -> Received {
        let mut stream = self.lock();
        stream.get_mut().incoming.push_back(datagram);
        let mut data = Vec::new();
        let mut buf = vec![0u8; max];
        loop {
            match stream.ssl_read(&mut buf) {
                Ok(n) => data.push(buf[..n].to_vec()),
                Err(e) if e.code() == ErrorCode::WANT_READ => break,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                    let _ = stream.shutdown();
                    return Received::Closed(std::mem::take(&mut stream.get_mut().outgoing));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "DTLS session failed");
                    return Received::Closed(std::mem::take(&mut stream.get_mut().outgoing));
                }
            }
        }
        Received::Data(data, std::mem::take(&mut stream.get_mut().outgoing))
    }

    /// Encrypts `bytes` as one record; returns the datagram(s) to send.
    pub(super) fn seal(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut stream = self.lock();
        if let Err(e) = stream.ssl_write(bytes) {
            tracing::debug!(error = %e, "cannot encrypt a CoAP response");
        }
        std::mem::take(&mut stream.get_mut().outgoing)
    }

    /// A close_notify alert to send.
    pub(super) fn close(&self) -> Vec<Vec<u8>> {
        let mut stream = self.lock();
        let _ = stream.shutdown();
        std::mem::take(&mut stream.get_mut().outgoing)
    }
}

/// The ClientHello of `datagram` (epoch 0, whole, one record as [`super::dtls_front`]
/// admits): its message's cookie, client random and record sequence number.
pub(crate) struct HelloFields<'a> {
    pub(super) record_sequence: [u8; 8],
    pub(super) message_seq: [u8; 2],
    pub(super) cookie: &'a [u8],
}

/// Finds the ClientHello in the first record of `datagram`.
pub(crate) fn hello_fields(datagram: &[u8]) -> Option<HelloFields<'_>> {
    let record = datagram.get(..RECORD_HEADER)?;
    if record[0] != 22 || record[3..5] != [0, 0] {
        return None;
    }
    let handshake = datagram.get(RECORD_HEADER..)?;
    if *handshake.first()? != 1 {
        return None;
    }
    let body = handshake.get(HANDSHAKE_HEADER..)?;
    let cookie_at = 2 + 32 + 1 + *body.get(34)? as usize;
    let cookie_len = *body.get(cookie_at)? as usize;
    Some(HelloFields {
        record_sequence: record[3..11].try_into().ok()?,
        message_seq: handshake.get(4..6)?.try_into().ok()?,
        cookie: body.get(cookie_at + 1..cookie_at + 1 + cookie_len)?,
    })
}

/// The HelloVerifyRequest answering `hello` (RFC 6347 §4.2.1): record sequence number
/// and message_seq of the ClientHello, version DTLS 1.0 (as the RFC asks), `cookie`.
pub(crate) fn hello_verify_request(hello: &HelloFields<'_>, cookie: &[u8]) -> Vec<u8> {
    let body_len = 3 + cookie.len();
    let mut out = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
    out.extend_from_slice(&[22, 0xfe, 0xff]);
    out.extend_from_slice(&hello.record_sequence);
    out.extend_from_slice(&((HANDSHAKE_HEADER + body_len) as u16).to_be_bytes());
    let u24 = |n: usize| [(n >> 16) as u8, (n >> 8) as u8, n as u8];
    out.push(3);
    out.extend_from_slice(&u24(body_len));
    out.extend_from_slice(&hello.message_seq);
    out.extend_from_slice(&u24(0));
    out.extend_from_slice(&u24(body_len));
    out.extend_from_slice(&[0xfe, 0xff, cookie.len() as u8]);
    out.extend_from_slice(cookie);
    out
}

/// From a ClientHello with cookie (message_seq 1): the synthetic first ClientHello
/// (cookie removed, message_seq 0, record sequence 0) and the real one with record
/// sequence 1 (epoch-0 record numbers are not authenticated; this keeps OpenSSL's
/// replay window from taking the real one for a duplicate of the synthetic one).
pub(crate) fn rewrite_for_handover(datagram: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let record_len = u16::from_be_bytes([*datagram.get(11)?, *datagram.get(12)?]) as usize;
    let record = datagram.get(..RECORD_HEADER + record_len)?;
    let message = record.get(RECORD_HEADER..)?;
    let body = message.get(HANDSHAKE_HEADER..)?;
    let cookie_at = 2 + 32 + 1 + *body.get(34)? as usize;
    let cookie_len = *body.get(cookie_at)? as usize;
    let mut synthetic_body = body.get(..cookie_at)?.to_vec();
    synthetic_body.push(0);
    synthetic_body.extend_from_slice(body.get(cookie_at + 1 + cookie_len..)?);
    let u24 = |n: usize| [(n >> 16) as u8, (n >> 8) as u8, n as u8];
    let mut synthetic = record[..3].to_vec();
    synthetic.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    synthetic.extend_from_slice(&((HANDSHAKE_HEADER + synthetic_body.len()) as u16).to_be_bytes());
    synthetic.push(1);
    synthetic.extend_from_slice(&u24(synthetic_body.len()));
    synthetic.extend_from_slice(&[0, 0]);
    synthetic.extend_from_slice(&u24(0));
    synthetic.extend_from_slice(&u24(synthetic_body.len()));
    synthetic.extend_from_slice(&synthetic_body);
    let mut real = datagram.to_vec();
    real[3..11].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    Some((synthetic, real))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_bound_to_the_peer() {
        let key = CookieKey::random();
        let peer: SocketAddr = "192.0.2.1:5684".parse().unwrap();
        let cookie = key.cookie(peer);
        assert!(key.verify(peer, &cookie));
        assert!(!key.verify("192.0.2.1:5685".parse().unwrap(), &cookie));
        assert!(!key.verify("192.0.2.2:5684".parse().unwrap(), &cookie));
        assert!(!key.verify(peer, &cookie[..8]));
        assert!(!CookieKey::random().verify(peer, &cookie));
    }
}
